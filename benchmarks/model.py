"""Forward+backward of the whole NL I3D ResNet-50 with nlnet's non-local blocks vs pytorchvideo's, same weights.

Both networks are ``nlnet.models.create("nl_i3d_r50")`` on one 3x32x224x224 clip (batch 1, train mode, float32,
or under CPU autocast with ``--autocast bf16``);
in the second, each of the five ``NonLocalBlock`` modules is replaced by pytorchvideo's ``NonLocal``
(``create_nonlocal``, softmax instantiation, pool 1x2x2 before φ and g: the same function) holding a copy of
the block's weights. The non-local weights are randomised first (BN γ = 1), so the blocks are not the identity
and the check that both networks give the same logits is not trivial.

* **time**: median of ``--repeats`` runs per network in one process, interleaved A B A B so that load from
  other processes hits both alike, after one warm-up run each.
* **saved MiB**: bytes autograd keeps for backward (`nlnet.utils.memory.SavedTensorCounter`), exact.
* **peak MiB**: rise of the process's resident set during one forward+backward after a warm-up, in a fresh
  process per network (``VmHWM`` reset right before; glibc's mmap threshold pinned, as in
  ``benchmarks/block.py``); it includes the weights' gradients.

Run ``python benchmarks/model.py`` (10 forward+backward passes of a 41-GMAC network; minutes on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402
from block import (  # noqa: E402
    AUTOCAST_DTYPES,
    _in_fresh_process,
    _pin_mmap_threshold,
    _proc_status_kib,
    _reset_peak_rss,
    autocast_context,
)

from nlnet.models import create, nonlocal_blocks  # noqa: E402
from nlnet.utils.memory import SavedTensorCounter  # noqa: E402

NETWORKS = ("nlnet", "pytorchvideo")
MiB = 2**20


def build(network: str, clip_shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The network (train mode), a clip and an output gradient; the same numbers for both networks."""
    torch.manual_seed(0)
    model = create("nl_i3d_r50")
    for seed, (name, block) in enumerate(nonlocal_blocks(model).items()):
        _peers.randomize_(block, seed=seed)
        if network == "pytorchvideo":
            stage, index, _ = name.split(".")
            getattr(model, stage)[int(index)].nonlocal_block = _peers._pytorchvideo_from(block, block.mode)
    generator = torch.Generator().manual_seed(1)
    clip = torch.randn(1, *clip_shape, generator=generator)
    grad = torch.randn(1, 400, generator=generator)
    return model.train(), clip, grad


def _fwd_bwd(model: torch.nn.Module, clip: torch.Tensor, grad: torch.Tensor, autocast: str | None) -> None:
    with autocast_context(autocast):
        logits = model(clip)
    logits.backward(grad.to(logits.dtype))
    model.zero_grad(set_to_none=True)


def check_equal(clip_shape: tuple[int, ...]) -> float:
    """Max |Δ| between the two networks' logits (eval mode) relative to the logits' scale."""
    outputs = []
    for network in NETWORKS:
        model, clip, _ = build(network, clip_shape)
        with torch.no_grad():
            outputs.append(model.eval()(clip))
    return ((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max()).item()


def measure_memory(network: str, clip_shape: tuple[int, ...], threads: int, autocast: str | None) -> dict:
    """In a fresh process: the saved-for-backward bytes and the peak RSS rise of one forward+backward."""
    torch.set_num_threads(threads)
    _pin_mmap_threshold()
    model, clip, grad = build(network, clip_shape)
    _fwd_bwd(model, clip, grad, autocast)  # warm-up: one-time allocations and kernel set-up
    excluded = [clip, grad, *model.parameters(), *model.buffers()]
    gc.collect()
    baseline = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    with SavedTensorCounter(exclude=excluded) as counter, autocast_context(autocast):
        out = model(clip)
    out.backward(grad.to(out.dtype))
    peak = (_proc_status_kib("VmHWM") - baseline) * 1024
    return {"saved_bytes": counter.nbytes, "peak_bytes": peak}


def measure_times(clip_shape: tuple[int, ...], threads: int, repeats: int,
                  autocast: str | None) -> dict[str, list[float]]:
    """In one process: seconds per forward+backward of both networks, interleaved run by run (A B A B ...)."""
    torch.set_num_threads(threads)
    built = {network: build(network, clip_shape) for network in NETWORKS}
    for args in built.values():
        _fwd_bwd(*args, autocast)  # warm-up
    times: dict[str, list[float]] = {network: [] for network in NETWORKS}
    for _ in range(repeats):
        for network, args in built.items():
            start = time.perf_counter()
            _fwd_bwd(*args, autocast)
            times[network].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per network, after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a busy box)")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                        help="run the forwards under CPU autocast to this dtype (default: float32)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a measurement is killed")
    args = parser.parse_args(argv)
    clip_shape = (3, args.frames, args.size, args.size)
    started = time.time()

    relative_diff = check_equal((3, 16, 112, 112))
    if relative_diff > 1e-4:
        print(f"the networks differ: relative max |Δ| of the logits {relative_diff:.2e}")
        return 1
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "nlnet", "_peers"])
    memory = {}
    for network in NETWORKS:
        status, value = _in_fresh_process(context, measure_memory, (network, clip_shape, args.threads, args.autocast),
                                           args.timeout)
        if status != "ok":
            raise RuntimeError(f"memory of {network}: {value}")
        memory[network] = value
    status, times = _in_fresh_process(context, measure_times, (clip_shape, args.threads, args.repeats, args.autocast),
                                        args.timeout)
    if status != "ok":
        raise RuntimeError(f"timing: {times}")
    median = {network: statistics.median(times[network]) for network in NETWORKS}

    precision = "float32" if args.autocast is None else f"autocast {args.autocast}"
    command = "python benchmarks/model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"nl_i3d_r50, clip 1x{'x'.join(map(str, clip_shape))}, train mode, {precision}, {args.threads} torch "
        f"thread(s), torch {torch.__version__}; logits of the two networks agree to {relative_diff:.1e} "
        f"(relative, eval mode, 16x112x112 clip); {time.time() - started:.0f} s in all.",
        "",
        "| non-local blocks | fwd+bwd median s (runs) | saved for backward MiB | peak RSS rise MiB |",
        "|---|---|---|---|",
    ]
    for network in NETWORKS:
        seconds = ", ".join(f"{t:.1f}" for t in times[network])
        lines.append(
            f"| {network} | {median[network]:.2f} ({seconds}) | {memory[network]['saved_bytes'] / MiB:.0f} | "
            f"{memory[network]['peak_bytes'] / MiB:.0f} |"
        )
    paired = statistics.median(a / b for a, b in zip(times["nlnet"], times["pytorchvideo"], strict=True))
    ours, theirs = memory["nlnet"], memory["pytorchvideo"]
    lines += [
        "",
        f"nlnet / pytorchvideo: time {median['nlnet'] / median['pytorchvideo']:.2f}x (median of the per-round "
        f"ratios {paired:.3f}x), saved for backward "
        f"{ours['saved_bytes'] / theirs['saved_bytes']:.3f}x "
        f"({(theirs['saved_bytes'] - ours['saved_bytes']) / MiB:.0f} MiB less), peak "
        f"{ours['peak_bytes'] / theirs['peak_bytes']:.3f}x "
        f"({(theirs['peak_bytes'] - ours['peak_bytes']) / MiB:.0f} MiB less).",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
