"""One GPU run of everything nlnet's speed and memory claims need: block, whole network, data loader, DDP.

Sections (``--sections``, all by default), each with its own time budget so that the whole run fits in
8 minutes on one H200; a case that would start after its section's budget is recorded as skipped:

* ``block``: forward+backward time and peak CUDA memory of one non-local block at the paper's 3-D shapes
  (``benchmarks/block.py``'s table: NL-I3D R50 res3 and res4) for nlnet, the explicit N×M form, pytorchvideo
  and mmcv (peers that are not installed are skipped), in float32 and under bf16 autocast. Each row records
  which scaled-dot-product-attention kernel ran (read from the profiler's op names); nlnet's rows are also run
  with ``torch.nn.attention.sdpa_kernel`` restricted to each backend in turn, recording which succeed.
* ``model``: nl_i3d_r50 training steps per second (forward, loss, backward, SGD step; bf16 autocast) on
  synthetic clips at 8×8 and 32×2, eager and ``torch.compile``d (the first compiled steps, which compile, are
  warm-up).
* ``loader``: clips/s of the loader on generated H.264 mp4s re-encoded by ``nlnet data prepare`` (a key frame
  every 16 frames, so clips are decoded from the key frame before them), with the augmentation in the workers
  and on the device (``data.augment_on``), alone and feeding 8×8 training steps.
* ``ddp``: clips/s of DDP over every visible GPU (NCCL, one spawned process per GPU) against one GPU; skipped
  with a note on a one-GPU machine. On CPU (``--device cpu``) two gloo processes run it as a smoke test.

Timing: warm-up runs first, then the median of ``--repeats`` runs, each timed with CUDA events around the work
(synchronised) on CUDA and ``time.perf_counter`` on CPU. Peak memory is ``torch.cuda.max_memory_allocated``
after a reset, minus what was allocated before the case: the case's own activations, gradients and workspace.

Run ``python benchmarks/gpu.py --out results/gpu`` on a CUDA machine; ``--device cpu --quick`` runs every
section on tiny shapes and a tiny model in seconds (the test suite's smoke test). Writes ``gpu.json`` and
``gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import block as block_bench  # noqa: E402

from nlnet.models import create  # noqa: E402

SECTIONS = ("block", "model", "loader", "ddp")
# Seconds per section on the full run: 8 minutes in all with room for start-up and the loader's encoding.
BUDGET_S = {"block": 90.0, "model": 240.0, "loader": 60.0, "ddp": 60.0}
BLOCK_IMPLS = ("nlnet", "explicit", "pytorchvideo", "mmcv")  # timm's NonLocalAttn is 2-D only
PRECISIONS = ("float32", "bf16")
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "memory_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# aten op names (prefixes) that tell which SDPA kernel a forward ran; the CPU flash kernel ends in "_for_cpu".
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory_efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}
QUICK_SHAPE = block_bench.Shape("tiny", "tiny", 3, 16, (2, 4, 4), 2, "paper")
MiB = 2**20


@dataclasses.dataclass
class Options:
    device: torch.device
    quick: bool
    repeats: int
    warmup: int


class Section:
    """A section's results and its deadline: ``expired()`` once its budget is spent."""

    def __init__(self, name: str, budget_s: float) -> None:
        self.name, self.deadline = name, time.perf_counter() + budget_s
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def expired(self) -> bool:
        return time.perf_counter() > self.deadline


# --------------------------------------------------------------------------------------------- measuring


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(work: Callable[[], None], options: Options, repeats: int | None = None) -> list[float]:
    """Milliseconds per call of ``work`` after ``options.warmup`` calls: CUDA events on CUDA, else perf_counter."""
    for _ in range(options.warmup):
        work()
    times = []
    for _ in range(repeats or options.repeats):
        if options.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            work()
            times.append(1e3 * (time.perf_counter() - began))
    return times


def peak_bytes(work: Callable[[], None], device: torch.device) -> int | None:
    """CUDA memory ``work`` allocates at its peak beyond what was allocated before; None off CUDA."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def sdpa_ops_run(work: Callable[[], None]) -> list[str]:
    """The SDPA kernels (names of :data:`SDPA_OPS`) one call of ``work`` ran; empty if it used none."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        work()
    names = {event.key for event in profile.key_averages()}
    return sorted({kernel for op, kernel in SDPA_OPS.items() if any(name.startswith(op) for name in names)})


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# --------------------------------------------------------------------------------------------- block


def run_block(section: Section, options: Options) -> None:
    shapes = [QUICK_SHAPE] if options.quick else [s for s in block_bench.SHAPES.values()
                                                  if s.kind == "paper" and s.dim == 3]
    installed = set(block_bench.installed_peers())
    impls = [impl for impl in BLOCK_IMPLS if impl in ("nlnet", "explicit") or impl in installed]
    section.notes += [f"{peer} is not installed: skipped" for peer in BLOCK_IMPLS[2:] if peer not in installed]
    for group in block_bench.plan(shapes, ["embedded_gaussian"], impls):
        for case in group:
            for precision in PRECISIONS:
                row = {"shape": case.shape.name, "describe": case.shape.describe(), "impl": case.row_name,
                       "precision": precision}
                if section.expired():
                    section.rows.append({**row, "status": "skipped: section budget spent"})
                    continue
                section.rows.append({**row, **_block_case(case, precision, options)})
                torch.cuda.empty_cache() if options.device.type == "cuda" else None


def _block_case(case: block_bench.Case, precision: str, options: Options) -> dict[str, Any]:
    device = options.device
    try:
        module, _, x, dy = block_bench._build(case)
    except block_bench._peers.Unsupported as reason:
        return {"status": f"unsupported: {reason}"}
    module, x, dy = module.to(device), x.to(device).detach().requires_grad_(), dy.to(device)

    def fwd_bwd() -> None:
        with _autocast(precision, device):
            out = module(x)
        out.backward(dy.to(out.dtype))
        module.zero_grad(set_to_none=True)
        x.grad = None

    try:
        fwd_bwd()  # first call: lazy initialisation and cuDNN/cuBLAS set-up stay out of the peak
        result: dict[str, Any] = {"sdpa": sdpa_ops_run(fwd_bwd), "peak_bytes": peak_bytes(fwd_bwd, device)}
        times = time_ms(fwd_bwd, options)
        result.update(status="ok", time_ms=statistics.median(times), times_ms=times)
        if case.impl == "nlnet":
            result["restricted"] = {name: _restricted(fwd_bwd, backend, options)
                                    for name, backend in SDPA_BACKENDS.items()}
    except RuntimeError as error:
        if not _is_oom(error):
            raise
        return {"status": "oom"}
    return result


def _restricted(fwd_bwd: Callable[[], None], backend: SDPBackend, options: Options) -> dict[str, Any]:
    """nlnet's block with SDPA limited to one backend: whether it runs, what it ran, and its time."""
    with sdpa_kernel([backend]):
        try:
            ran = sdpa_ops_run(fwd_bwd)
        except RuntimeError as error:  # "No available kernel": the backend cannot take this shape or dtype
            return {"status": "unavailable", "message": str(error).splitlines()[0][:200]}
        times = time_ms(fwd_bwd, options, repeats=max(1, options.repeats // 2))
    return {"status": "ok", "sdpa": ran, "time_ms": statistics.median(times)}


# --------------------------------------------------------------------------------------------- model


def _model_and_clip(clip: str, options: Options, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """nl_i3d_r50 (or, with --quick, a one-block-per-stage width-8 NL C2D) with a synthetic batch."""
    torch.manual_seed(0)
    if options.quick:
        model = create("nl_c2d_r50", stage_blocks=(1, 1, 1, 1), base_width=8, nonlocal_blocks={"res3": [0]},
                       num_classes=3, clip=clip)
        frames, size, classes = 8, 32, 3
    else:
        model = create("nl_i3d_r50", clip=clip)
        frames, size, classes = int(clip.split("x")[0]), 224, 400
    clips = torch.randn(batch, 3, frames, size, size, device=options.device)
    labels = torch.randint(0, classes, (batch,), device=options.device)
    return model.to(options.device).train(), clips, labels


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clips: torch.Tensor,
                labels: torch.Tensor, device: torch.device) -> None:
    # bf16 autocast: what a run on a current GPU trains with (train.amp=bf16); the loss in float32 as in train.py.
    with _autocast("bf16", device):
        logits = model(clips)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _batch(options: Options) -> int:
    return 2 if options.quick else 8  # the paper's 8 clips per GPU


def run_model(section: Section, options: Options) -> None:
    for clip in ("8x8", "32x2"):
        for compiled in (False, True):
            row = {"model": "tiny NL C2D" if options.quick else "nl_i3d_r50", "clip": clip,
                   "compiled": compiled, "batch": _batch(options)}
            if section.expired():
                section.rows.append({**row, "status": "skipped: section budget spent"})
                continue
            model, clips, labels = _model_and_clip(clip, options, _batch(options))
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            # On CPU, inductor's C++ build takes minutes: the smoke test compiles with aot_eager, which traces
            # the same graphs (forward and backward) without generating code.
            backend = "inductor" if options.device.type == "cuda" else "aot_eager"
            runner = torch.compile(model, backend=backend) if compiled else model
            row["backend"] = backend if compiled else None
            began = time.perf_counter()
            _train_step(runner, optimizer, clips, labels, options.device)
            _synchronize(options.device)
            first_s = time.perf_counter() - began  # includes the compilation when compiled
            try:
                times = time_ms(lambda r=runner, o=optimizer, c=clips, y=labels:
                                _train_step(r, o, c, y, options.device), options)
            except RuntimeError as error:
                if not _is_oom(error):
                    raise
                section.rows.append({**row, "status": "oom"})
                continue
            step_ms = statistics.median(times)
            section.rows.append({**row, "status": "ok", "first_step_s": first_s, "step_ms": step_ms,
                                 "times_ms": times, "clips_per_s": 1e3 * _batch(options) / step_ms})
            del model, runner, optimizer, clips, labels
            if options.device.type == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- loader


def _write_videos(folder: Path, options: Options) -> Path:
    """Moving-texture H.264 mp4s shaped like a Kinetics dump (340×256, 10 s at 25 fps) and a path_csv list."""
    from nlnet.data.builtin import encode_mp4

    count, frames, (height, width) = (2, 12, (40, 48)) if options.quick else (8, 250, (256, 340))
    rows = []
    for index in range(count):
        texture = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        video = np.stack([np.roll(texture, 3 * t, axis=1) for t in range(frames)])
        encode_mp4(folder / f"{index}.mp4", video, fps=25, crf=23)
        rows.append(f"{index}.mp4,{index % 3}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "train.csv"


def run_loader(section: Section, options: Options) -> None:
    from nlnet.data import build_dataset, build_loader
    from nlnet.data.prepare import PREPARED_LIST, prepare_videos

    batch = _batch(options)
    workers = 0 if options.quick else min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "source").mkdir()
        _write_videos(Path(tmp) / "source", options)
        short_side = 40 if options.quick else 256
        prepare_videos(Path(tmp) / "source" / "train.csv", Path(tmp) / "prepared", short_side=short_side,
                       keyframe_interval=16, workers=max(1, workers), progress=False)
        crop, scales = (32, [40, 48]) if options.quick else (224, [256, 320])
        steps = 2 if options.quick else 30
        model, _, _ = _model_and_clip("8x8", options, batch)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for augment_on, feeds_training in itertools.product(("worker", "device"), (False, True)):
            if section.expired():
                section.rows.append({"augment_on": augment_on, "feeds_training": feeds_training,
                                     "status": "skipped: section budget spent"})
                continue
            root = Path(tmp) / "prepared"
            dataset = build_dataset({"format": "path_csv", "root": str(root), "train_list": str(root / PREPARED_LIST),
                                     "num_classes": 3, "num_frames": 8, "sampling_rate": 8,
                                     "train_jitter_scales": scales, "train_crop": crop}, "train", normalized=False,
                                    augment_on=augment_on)
            loader = build_loader(dataset, batch, shuffle=True, num_workers=workers, drop_last=True,
                                  pin_memory=options.device.type == "cuda")
            seen, epoch, began = 0, 0, None
            while seen < steps * batch:
                dataset.set_epoch(epoch)
                for loaded in loader:
                    if began is None:  # the first batch pays for starting the workers
                        began = time.perf_counter()
                        continue
                    if feeds_training:
                        clips = dataset.model_input(loaded, options.device)
                        _train_step(model, optimizer, clips, loaded["label"].to(options.device), options.device)
                    seen += len(loaded["index"])
                    if seen >= steps * batch:
                        break
                epoch += 1
            _synchronize(options.device)
            section.rows.append({"augment_on": augment_on, "feeds_training": feeds_training, "status": "ok",
                                 "workers": workers, "clips": seen,
                                 "clips_per_s": seen / (time.perf_counter() - began)})
            del loader


# --------------------------------------------------------------------------------------------- ddp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, quick: bool, device_type: str, steps: int,
                results: Any) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from nlnet.engine.distributed import cleanup_distributed, setup_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = setup_distributed(device_type)
    try:
        options = Options(ctx.device, quick, repeats=steps, warmup=2)
        model, clips, labels = _model_and_clip("8x8", options, _batch(options))
        # One process is the single-GPU baseline: no process group, no DDP wrapper (as train.py runs it).
        ddp = DistributedDataParallel(model, device_ids=[rank] if device_type == "cuda" else None) \
            if world_size > 1 else model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        times = time_ms(lambda: _train_step(ddp, optimizer, clips, labels, ctx.device), options)
        if rank == 0:
            results.put(statistics.median(times))
    finally:
        cleanup_distributed()


def _ddp_step_ms(world_size: int, options: Options) -> float:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(world_size, _free_port(), options.quick, options.device.type,
                                          options.repeats, results), nprocs=world_size, start_method="spawn")
    return results.get()


def run_ddp(section: Section, options: Options) -> None:
    gpus = torch.cuda.device_count() if options.device.type == "cuda" else 0
    if options.device.type == "cuda" and gpus < 2:
        section.notes.append(f"{gpus} GPU visible: DDP needs at least 2, skipped")
        return
    world_size = gpus if gpus >= 2 else 2
    if gpus < 2:
        section.notes.append("CPU smoke test: 2 gloo processes; the numbers say nothing about NCCL")
    batch = _batch(options)
    for processes in (1, world_size):
        if section.expired():
            section.rows.append({"processes": processes, "status": "skipped: section budget spent"})
            continue
        step_ms = _ddp_step_ms(processes, options)
        section.rows.append({"processes": processes, "status": "ok", "batch_per_process": batch,
                             "step_ms": step_ms, "clips_per_s": 1e3 * batch * processes / step_ms})
    single, multi = section.rows[0].get("clips_per_s"), section.rows[-1].get("clips_per_s")
    if single and multi and len(section.rows) == 2:
        section.notes.append(f"scaling efficiency {multi / (single * world_size):.2f} over {world_size} processes")


RUNNERS = {"block": run_block, "model": run_model, "loader": run_loader, "ddp": run_ddp}


# --------------------------------------------------------------------------------------------- report


def _cell(value: float | int | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables, one per section that ran."""
    lines = [f"`{report['command']}` — {report['environment']}", ""]
    sections = report["sections"]
    if "block" in sections:
        lines += ["### Non-local block, forward+backward", "",
                  "| shape | impl | precision | ms | peak MiB | SDPA ran | nlnet restricted to (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for row in sections["block"]["rows"]:
            restricted = ", ".join(f"{name} {_cell(r.get('time_ms'), digits=2)}" if r["status"] == "ok"
                                   else f"{name} unavailable" for name, r in row.get("restricted", {}).items())
            lines.append(f"| {row['describe']} | {row['impl']} | {row['precision']} | "
                         f"{_cell(row.get('time_ms'), digits=2) if row['status'] == 'ok' else row['status']} | "
                         f"{_cell(row.get('peak_bytes'), MiB, 0)} | {', '.join(row.get('sdpa', [])) or '–'} | "
                         f"{restricted or '–'} |")
    if "model" in sections:
        lines += ["", "### Training steps (bf16 autocast, SGD), synthetic clips", "",
                  "| model | clip | batch | compiled | first step s | step ms | clips/s |",
                  "|---|---|---|---|---|---|---|"]
        for row in sections["model"]["rows"]:
            lines.append(f"| {row['model']} | {row['clip']} | {row['batch']} | {row['compiled']} | "
                         f"{_cell(row.get('first_step_s'))} | {_cell(row.get('step_ms'))} | "
                         f"{_cell(row.get('clips_per_s')) if row['status'] == 'ok' else row['status']} |")
    if "loader" in sections:
        lines += ["", "### Loader (8×8 clips, prepared files)", "",
                  "| augmentation on | feeds training | workers | clips/s |", "|---|---|---|---|"]
        for row in sections["loader"]["rows"]:
            lines.append(f"| {row['augment_on']} | {row['feeds_training']} | {row.get('workers', '–')} | "
                         f"{_cell(row.get('clips_per_s')) if row['status'] == 'ok' else row['status']} |")
    if "ddp" in sections:
        lines += ["", "### DDP (8×8 training steps)", "", "| processes | clips/s |", "|---|---|"]
        for row in sections["ddp"]["rows"]:
            lines.append(f"| {row['processes']} | "
                         f"{_cell(row.get('clips_per_s')) if row['status'] == 'ok' else row['status']} |")
    for name, section in sections.items():
        lines += [f"- {name}: {note}" for note in section["notes"]]
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return f"torch {torch.__version__}, {where}, {time.strftime('%Y-%m-%d')}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and model, 1 repeat: a smoke test")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10; 1 with --quick)")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu --quick for the smoke test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 10)
    options = Options(device, args.quick, repeats=repeats, warmup=1 if args.quick else 3)
    if device.type == "cuda":
        # What train.py runs with (train.cudnn_benchmark, train.tf32 default true).
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    report: dict[str, Any] = {
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(device), "quick": args.quick, "repeats": repeats, "sections": {},
    }
    for name in args.sections:
        section = Section(name, BUDGET_S[name])
        began = time.perf_counter()
        RUNNERS[name](section, options)
        report["sections"][name] = {"rows": section.rows, "notes": section.notes,
                                    "seconds": time.perf_counter() - began}
        print(f"{name}: {report['sections'][name]['seconds']:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (args.out / "gpu.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
