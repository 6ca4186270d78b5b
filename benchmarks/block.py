"""Forward+backward time and memory of nlnet's NonLocalBlock next to the explicit N×M form and its peers.

One run measures, for every (shape, mode, implementation):

* **time**: median wall time of ``out = module(x); out.backward(dy)`` (train mode). The implementations of one
  (shape, mode) are timed in one process, interleaved run by run (A B C A B C ...) after one warm-up run each,
  so that load from other processes hits them alike; at least 3 and at most ``--repeats`` rounds, fewer than
  ``--repeats`` once the rounds have used ``--case-seconds`` per implementation. The timing process keeps
  glibc's default allocator behaviour (the mmap threshold is pinned only for the peak measurement).
* **saved MiB**: the bytes of the tensors autograd keeps for backward, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks`` (:class:`nlnet.utils.SavedTensorCounter`): each storage once,
  the input, parameters, buffers and views of them excluded.
* **peak MiB**: the rise of the process's resident set during one forward+backward in a fresh process, after
  the equality check, the counting forward and one full-size warm-up run (which absorbs the buffers MKL and
  oneDNN keep after their first call at a size): the kernel's high-water mark (``VmHWM``) is reset through
  ``/proc/self/clear_refs`` right before the run and read after it, minus ``VmRSS`` before it. glibc's mmap
  threshold is pinned at 64 KiB so freed tensors go back to the OS and earlier runs cannot hide the peak.
  It includes the parameter and input gradients.

Memory is measured with each case in a fresh process (a fork of a forkserver that has imported torch) whose
address space is capped (``RLIMIT_AS``) at ``--memory-cap-gib`` above what it had after building the modules;
a case that needs more is reported as ``OOM (> cap)`` — not timed, not run to the machine's limit.

Before a peer or the explicit form is timed, the case process checks on the full-size input that it computes
the same output as the nlnet block it copied its weights from (BN γ = 1, so the output depends on the
attention); a mismatch is reported and the case is not timed. nlnet is configured to match each peer's
semantics (``_peers.nlnet_config``): rows ``nlnet≡mmcv`` / ``nlnet≡timm`` are nlnet in that peer's
configuration; pytorchvideo's configuration is nlnet's reference one.

float32, train mode, one torch thread by default (``--threads``), denormals flushed to zero (see
``_set_up_process``). ``--autocast bf16`` runs every forward (and the saved-bytes count) under CPU autocast to
bfloat16 instead; the equality check stays in float32.

Run ``python benchmarks/block.py`` (all shapes, modes and installed peers; long), ``--quick`` for a small
subset in under a minute, or filter with ``--shapes``, ``--modes``, ``--impls``; ``--markdown FILE`` writes
the table and the target verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402

from nlnet import NonLocalBlock  # noqa: E402
from nlnet.utils.memory import SavedTensorCounter  # noqa: E402

MiB = 2**20
GiB = 2**30
IMPLS = ("nlnet", "explicit", *_peers.PEERS)
PEER_PACKAGES = {"pytorchvideo": "pytorchvideo", "mmcv": "mmcv", "timm": "timm"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked input: ``kind`` picks the activation-memory target ("paper": 3/4, "long": 1/4)."""

    name: str
    label: str
    dim: int
    channels: int
    spatial: tuple[int, ...]
    batch: int
    kind: str

    def describe(self) -> str:
        return f"{self.label} C={self.channels} {'×'.join(map(str, self.spatial))} B={self.batch}"


SHAPES = {shape.name: shape for shape in (
    Shape("res3_b2", "NL-I3D res3", 3, 512, (4, 28, 28), 2, "paper"),
    Shape("res3_b8", "NL-I3D res3", 3, 512, (4, 28, 28), 8, "paper"),
    Shape("res4_b2", "NL-I3D res4", 3, 1024, (4, 14, 14), 2, "paper"),
    Shape("res4_b8", "NL-I3D res4", 3, 1024, (4, 14, 14), 8, "paper"),
    Shape("det_res4", "detection res4 (2-D)", 2, 1024, (64, 96), 2, "paper"),
    Shape("long_res3", "long-clip res3", 3, 512, (16, 28, 28), 1, "long"),
)}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}
QUICK = {"shapes": ["res4_b2"], "modes": ["embedded_gaussian"], "repeats": 3}

# Output agreement required before timing: max |Δ| ≤ TOLERANCE · max |residual branch|. The unscaled Gaussian
# mode (mmcv) has logits of size ~C, where float32 reordering moves a near-one-hot softmax by ~1e-4.
TOLERANCE = 1e-3


@dataclasses.dataclass
class Case:
    """One row: ``impl`` run with nlnet configured as ``config_of`` (itself for nlnet rows, else the peer)."""

    shape: Shape
    mode: str
    impl: str
    config_of: str

    @property
    def row_name(self) -> str:
        if self.impl == "nlnet" and self.config_of not in ("nlnet", "explicit", "pytorchvideo"):
            return f"nlnet≡{self.config_of}"
        return self.impl


@dataclasses.dataclass
class Result:
    case: Case
    status: str  # ok | oom | unsupported | mismatch | no_backward | error
    time_ms: float | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    max_diff: float | None = None
    message: str = ""


# ---------------------------------------------------------------------------------------------- case process


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # "5" resets the process's resident-set high-water mark (Linux ≥ 4.0, proc(5)).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _pin_mmap_threshold() -> None:
    # glibc raises its mmap threshold dynamically after frees, after which freed tensors stay in the heap and
    # hide later peaks; pinning it (M_MMAP_THRESHOLD = -3) sends every allocation ≥ 64 KiB to mmap/munmap.
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or ("alloc" in text and "memory" in text)


def autocast_context(name: str | None) -> contextlib.AbstractContextManager:
    """CPU autocast to ``AUTOCAST_DTYPES[name]``; ``None``: float32, no autocast."""
    return contextlib.nullcontext() if name is None else torch.autocast("cpu", dtype=AUTOCAST_DTYPES[name])


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, options: dict) -> None:
    with autocast_context(options.get("autocast")):
        out = module(x)
    out.backward(dy.to(out.dtype))
    module.zero_grad(set_to_none=True)
    x.grad = None


def _set_up_process(options: dict) -> None:
    torch.set_num_threads(options["threads"])
    # The unscaled Gaussian mode (mmcv's) drives most softmax weights below float32's normal range; without
    # flush-to-zero the CPU then spends ~10× longer on denormal arithmetic in every implementation alike.
    torch.set_flush_denormal(True)


def _build(case: Case) -> tuple[torch.nn.Module, NonLocalBlock, torch.Tensor, torch.Tensor]:
    """The module of a case, the nlnet block it copied its weights from, an input and an output gradient."""
    shape = case.shape
    config = _peers.nlnet_config(case.config_of, case.mode, shape.dim, shape.channels)
    block = NonLocalBlock(shape.channels, dim=shape.dim, mode=case.mode, **config)
    _peers.randomize_(block, seed=0).train()
    module = block if case.impl == "nlnet" else _peers.build(case.impl, block, mode=case.mode, dim=shape.dim,
                                                               config=config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape.batch, shape.channels, *shape.spatial, generator=generator).requires_grad_()
    dy = torch.randn(x.shape, generator=generator)
    return module, block, x, dy


def _load_lazy_code(module: torch.nn.Module, block: NonLocalBlock) -> None:
    """One forward+backward on a tiny input, so that modules torch imports on first use (sympy through custom
    autograd functions, ~100 MiB) are loaded before the address-space cap and outside the measured peak."""
    kernel = block.pool_kernel or (1,) * block.dim
    x = torch.randn(2, block.in_channels, *(2 * k for k in kernel), requires_grad=True)
    out = module(x).sum()
    with contextlib.suppress(RuntimeError):  # a broken backward is reported by the measured run
        out.backward()
    module.zero_grad(set_to_none=True)


def _cap_address_space(options: dict) -> None:
    cap = int(options["memory_cap_gib"] * GiB)
    address_space = _proc_status_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (address_space + cap, resource.RLIM_INFINITY))


def _oom_message(options: dict) -> str:
    return f"OOM (> {options['memory_cap_gib']:g} GiB)"


def check_and_measure_memory(case: Case, options: dict) -> Result:
    """In a fresh process: check the case against nlnet, count its saved bytes, measure its peak RSS rise."""
    _set_up_process(options)
    # Only here: with the threshold pinned every large allocation page-faults afresh, which would add ~30 % to
    # the timed runs (the timing process keeps glibc's default, which reuses freed memory as training does).
    _pin_mmap_threshold()
    result = Result(case, "ok")
    try:
        module, block, x, dy = _build(case)
    except _peers.Unsupported as reason:
        return dataclasses.replace(result, status="unsupported", message=str(reason))
    _load_lazy_code(module, block)
    _cap_address_space(options)
    try:
        if module is not block:
            with torch.no_grad():
                reference = block(x)
                residual = (reference - x).abs().max().item()
                result.max_diff = (module(x) - reference).abs().max().item()
            del reference
            if not result.max_diff <= TOLERANCE * max(residual, 1.0):
                result.status = "mismatch"
                result.message = f"max |Δ| {result.max_diff:.2e} vs nlnet (residual max {residual:.2e})"
                return result

        excluded = [x, dy, *module.parameters(), *module.buffers()]
        with SavedTensorCounter(exclude=excluded) as counter, autocast_context(options.get("autocast")):
            out = module(x)
        result.saved_bytes = counter.nbytes
        del out

        try:
            # A full-size warm-up: MKL and oneDNN keep ~30 MiB of buffers from the first run at a new size,
            # which would otherwise count towards whichever case runs first. Outside the counter, since
            # while its hooks are installed autograd skips its in-place checks.
            _fwd_bwd(module, x, dy, options)
        except RuntimeError as error:
            if _is_out_of_memory(error):
                raise
            # A peer whose backward is broken (mmcv's concatenation divides its ReLU output in place).
            result.status = "no_backward"
            result.message = "backward raises: " + str(error).split(":")[0]
            return result
        gc.collect()
        baseline = _proc_status_kib("VmRSS")
        _reset_peak_rss()
        _fwd_bwd(module, x, dy, options)
        result.peak_bytes = (_proc_status_kib("VmHWM") - baseline) * 1024
    except (RuntimeError, MemoryError) as error:
        if not _is_out_of_memory(error):
            raise
        result.status = "oom"
        result.message = _oom_message(options)
    return result


def measure_times(cases: list[Case], options: dict) -> list[list[float]]:
    """In a fresh process: fwd+bwd times (ms) of the cases, interleaved run by run so load hits all alike.

    One warm-up run each, then rounds of one timed run per case, at least ``min(3, repeats)`` rounds and at
    most ``repeats``, fewer once the rounds have used ``case_seconds`` per case.
    """
    _set_up_process(options)
    built = [_build(case) for case in cases]
    for module, block, _, _ in built:
        _load_lazy_code(module, block)
    _cap_address_space(options)
    for module, _, x, dy in built:
        _fwd_bwd(module, x, dy, options)
    times: list[list[float]] = [[] for _ in cases]
    spent = 0.0
    for round_index in range(options["repeats"]):
        for case_times, (module, _, x, dy) in zip(times, built, strict=True):
            start = time.perf_counter()
            _fwd_bwd(module, x, dy, options)
            elapsed = time.perf_counter() - start
            case_times.append(1e3 * elapsed)
            spent += elapsed
        if round_index + 1 >= min(3, options["repeats"]) and spent > options["case_seconds"] * len(cases):
            break
    return times


def _entry(function, args: tuple, connection) -> None:
    try:
        connection.send(("ok", function(*args)))
    except Exception as error:  # reported in the table rather than aborting the whole benchmark
        out_of_memory = isinstance(error, RuntimeError | MemoryError) and _is_out_of_memory(error)
        connection.send(("oom" if out_of_memory else "error", f"{type(error).__name__}: {error}"[:300]))
    connection.close()


# ---------------------------------------------------------------------------------------------- orchestration


def installed_peers() -> list[str]:
    return [peer for peer in _peers.PEERS if importlib.util.find_spec(PEER_PACKAGES[peer]) is not None]


def plan(shapes: Iterable[Shape], modes: Iterable[str], impls: Iterable[str]) -> list[list[Case]]:
    """One group of cases per (shape, mode): nlnet, explicit, each peer, nlnet configured as each peer."""
    impls = list(impls)
    groups = []
    for shape in shapes:
        for mode in modes:
            group = [Case(shape, mode, impl, impl) for impl in ("nlnet", "explicit") if impl in impls]
            for peer in (p for p in _peers.PEERS if p in impls):
                group.append(Case(shape, mode, peer, peer))
                if "nlnet" in impls:
                    group.append(Case(shape, mode, "nlnet", peer))
            groups.append(_dedupe_configs(group))
    return groups


def _dedupe_configs(group: list[Case]) -> list[Case]:
    """Drop nlnet≡peer rows whose configuration equals nlnet's reference one (or that cannot exist)."""
    kept = []
    for case in group:
        if case.impl == "nlnet" and case.config_of in _peers.PEERS:
            shape = case.shape
            try:
                config = _peers.nlnet_config(case.config_of, case.mode, shape.dim, shape.channels)
            except _peers.Unsupported:
                continue
            if config == _peers.nlnet_config("nlnet", case.mode, shape.dim, shape.channels):
                continue
        kept.append(case)
    return kept


def _in_fresh_process(context, function, args: tuple, timeout: float) -> tuple[str, object]:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_entry, args=(function, args, sender))
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            return receiver.recv()
        process.kill()
        return "error", f"timeout after {timeout:g} s"
    except EOFError:
        return "error", "process died without a result"
    finally:
        process.join()
        receiver.close()


def run_all(groups: list[list[Case]], options: dict,
            on_group: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Per group: each case checked and memory-measured in its own process, then the runnable ones timed.

    ``on_group`` is called with the results so far after each group (to save partial results of long runs).
    """
    context = multiprocessing.get_context("forkserver")
    # Preloading this module too (as __main__ when run as a script) pins the code of the whole run: case
    # processes are forks of the server and do not re-read files that may change while a long run goes on.
    context.set_forkserver_preload(list(dict.fromkeys(["__main__", __name__, "torch", "nlnet", "_peers"])))
    results = []
    total = sum(map(len, groups))
    for group in groups:
        group_results = []
        for case in group:
            status, payload = _in_fresh_process(context, check_and_measure_memory, (case, options),
                                                options["case_timeout"])
            if status == "ok":
                group_results.append(payload)
            else:
                message = _oom_message(options) if status == "oom" else str(payload)
                group_results.append(Result(case, status, message=message))
        runnable = [r for r in group_results if r.status == "ok"]
        status, payload = _in_fresh_process(context, measure_times, ([r.case for r in runnable], options),
                                            options["case_timeout"] * max(len(runnable), 1))
        timings = payload if status == "ok" else [None] * len(runnable)
        for result, times in zip(runnable, timings, strict=True):
            if times is None:
                result.status, result.message = "error", f"timing process failed: {payload}"
            else:
                result.times_ms, result.time_ms = times, statistics.median(times)
        for result in group_results:
            results.append(result)
            print(f"[{len(results)}/{total}] {result.case.shape.name} {result.case.mode} {result.case.row_name}: "
                  f"{_cell_time(result)} ms, saved {_cell_mib(result.saved_bytes)} MiB, "
                  f"peak {_cell_mib(result.peak_bytes)} MiB {result.message}", file=sys.stderr, flush=True)
        if on_group is not None:
            on_group(results)
    return results


# ---------------------------------------------------------------------------------------------- report


def _cell_time(result: Result) -> str:
    if result.status == "ok":
        return f"{result.time_ms:.1f}"
    return {"oom": result.message, "unsupported": "n/a", "no_backward": "backward fails"}.get(result.status,
                                                                                            result.status)


def _cell_mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / MiB:.1f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "–"
    return f"{numerator / denominator:.2f}"


def _find(results: list[Result], shape: Shape, mode: str, row: str) -> Result | None:
    for result in results:
        if result.case.shape == shape and result.case.mode == mode and result.case.row_name == row:
            return result
    return None


def _ok(result: Result | None) -> bool:
    return result is not None and result.status == "ok"


def _fastest_peer(results: list[Result], shape: Shape, mode: str) -> Result | None:
    peers = [r for r in results
             if r.case.shape == shape and r.case.mode == mode and r.case.impl in _peers.PEERS and _ok(r)]
    return min(peers, key=lambda r: r.time_ms, default=None)


def _nlnet_as(results: list[Result], shape: Shape, mode: str, peer: str) -> Result | None:
    return _find(results, shape, mode, f"nlnet≡{peer}") or _find(results, shape, mode, "nlnet")


def table(results: list[Result]) -> str:
    lines = [
        "| shape | mode | impl | fwd+bwd ms | × explicit | × fastest peer | saved MiB | saved × explicit | "
        "peak MiB | max abs Δ vs nlnet | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        if result.status == "unsupported":
            continue
        case = result.case
        explicit = _find(results, case.shape, case.mode, "explicit")
        fastest = _fastest_peer(results, case.shape, case.mode)
        ok = result.status == "ok"
        explicit_ok = _ok(explicit)
        lines.append("| " + " | ".join([
            case.shape.describe(),
            case.mode,
            case.row_name,
            _cell_time(result),
            _ratio(result.time_ms, explicit.time_ms) if ok and explicit_ok else "–",
            _ratio(result.time_ms, fastest.time_ms) if ok and fastest else "–",
            _cell_mib(result.saved_bytes),
            _ratio(result.saved_bytes, explicit.saved_bytes) if explicit_ok else "–",
            _cell_mib(result.peak_bytes),
            "–" if result.max_diff is None else f"{result.max_diff:.1e}",
            result.message if result.status in ("mismatch", "no_backward", "error") else "",
        ]) + " |")
    return "\n".join(lines)


def not_expressible(results: list[Result]) -> list[str]:
    """The peer/configuration pairs left out of the table, once per reason."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for result in results:
        if result.status == "unsupported":
            where = f"{result.case.shape.name} {result.case.mode}"
            reasons.setdefault((result.case.impl, result.message), []).append(where)
    return [f"{impl}: {message} ({len(where)} of the (shape, mode) pairs)"
            for (impl, message), where in reasons.items()]


def report(headers: list[str], results: list[Result]) -> str:
    """The markdown report: run headers, table, peers' gaps, target verdicts."""
    return "\n".join([
        "\n\n".join(headers),
        "",
        table(results),
        "",
        *(["Not run because the peer cannot express the mode or dimensionality:", "",
           *(f"- {line}" for line in not_expressible(results)), ""] if not_expressible(results) else []),
        "Targets:",
        "",
        *(f"- {line}" for line in verdicts(results)),
        "",
    ])


def _result_from_dict(raw: dict) -> Result:
    case = dict(raw["case"])
    case["shape"] = Shape(**{**case["shape"], "spatial": tuple(case["shape"]["spatial"])})
    return Result(**{**raw, "case": Case(**case)})


def load_results(path: Path) -> tuple[str, list[Result]]:
    """The header and results of a run saved with ``--json``."""
    saved = json.loads(path.read_text())
    return saved["header"], [_result_from_dict(raw) for raw in saved["results"]]


def verdicts(results: list[Result]) -> list[str]:
    """One PASS/FAIL/n.a. line per target and (shape, mode)."""
    lines = []
    groups = list(dict.fromkeys((r.case.shape, r.case.mode) for r in results))
    for shape, mode in groups:
        where = f"{shape.name} {mode}"
        nlnet = _find(results, shape, mode, "nlnet")
        explicit = _find(results, shape, mode, "explicit")

        fastest = _fastest_peer(results, shape, mode)
        if fastest is None:
            lines.append(f"n/a time ≤ fastest peer — {where}: no peer runs forward+backward here")
        else:
            ours = _nlnet_as(results, shape, mode, fastest.case.impl)
            limit = 1.0 if shape.kind == "long" else 1.1
            if _ok(ours):
                ratio = ours.time_ms / fastest.time_ms
                lines.append(f"{_verdict(ratio <= limit)} time ≤ {limit:g}× fastest peer — {where}: "
                             f"{ours.case.row_name} {ours.time_ms:.1f} ms vs {fastest.case.impl} "
                             f"{fastest.time_ms:.1f} ms = {ratio:.2f}×")
            else:
                lines.append(f"FAIL time ≤ {limit:g}× fastest peer — {where}: nlnet did not run")

        if _ok(nlnet) and _ok(explicit):
            limit = 0.25 if shape.kind == "long" else 0.75
            ratio = nlnet.saved_bytes / explicit.saved_bytes
            lines.append(f"{_verdict(ratio <= limit)} saved ≤ {limit:g}× explicit — {where}: "
                         f"{nlnet.saved_bytes / MiB:.1f} MiB vs {explicit.saved_bytes / MiB:.1f} MiB = "
                         f"{ratio:.3f}×")
            if mode == "dot_product" and shape.kind == "long":
                speedup = explicit.time_ms / nlnet.time_ms
                lines.append(f"{_verdict(speedup >= 3)} dot product ≥ 3× faster than explicit — {where}: "
                             f"{explicit.time_ms:.1f} ms / {nlnet.time_ms:.1f} ms = {speedup:.2f}×")
        elif nlnet is not None and explicit is not None:
            lines.append(f"FAIL saved ≤ explicit target — {where}: nlnet {nlnet.status}, explicit "
                         f"{explicit.status}")

        mmcv = _find(results, shape, mode, "mmcv")
        if mode == "concatenation" and mmcv is not None and mmcv.status != "unsupported":
            ours = _nlnet_as(results, shape, mode, "mmcv")
            if mmcv.saved_bytes is not None and _ok(ours):
                leaner = mmcv.saved_bytes / ours.saved_bytes
                lines.append(f"{_verdict(leaner >= 10)} concatenation ≥ 10× leaner than mmcv — {where}: "
                             f"{mmcv.saved_bytes / MiB:.1f} MiB / {ours.saved_bytes / MiB:.1f} MiB = "
                             f"{leaner:.1f}× (peak {_cell_mib(mmcv.peak_bytes)} / "
                             f"{_cell_mib(ours.peak_bytes)} MiB)")
            elif mmcv.status == "oom":
                lines.append(f"{_verdict(_ok(ours))} concatenation runs where mmcv is OOM — {where}: mmcv "
                             f"{mmcv.message}, nlnet≡mmcv {_cell_time(ours) if ours else 'missing'} ms")
    return lines


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def block_version() -> str:
    """The last commit touching nlnet/layers, marked "+ local changes" when the working tree differs."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M", "--", "nlnet/layers")
    if not commit:
        return "nlnet/layers at an unknown commit"
    dirty = git("status", "--porcelain", "--", "nlnet/layers")
    return f"nlnet/layers at {commit}" + (" + local changes" if dirty else "")


def environment(options: dict) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for peer in installed_peers():
        package = PEER_PACKAGES[peer]
        try:
            from importlib.metadata import version

            versions.append(f"{peer} {version('mmcv-lite' if peer == 'mmcv' else package)}")
        except Exception:  # metadata missing: name the package without a version
            versions.append(peer)
    precision = "float32" if options.get("autocast") is None else f"autocast {options['autocast']}"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {options['threads']} torch thread(s); "
            f"{', '.join(versions)}; {precision}, train mode; "
            f"memory cap {options['memory_cap_gib']:g} GiB per case")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small subset: shapes {QUICK['shapes']}, modes {QUICK['modes']}, 3 repeats")
    parser.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(_peers.MODES)}")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated subset of {','.join(IMPLS)} (default: all installed)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5; quick 3)")
    parser.add_argument("--case-seconds", type=float, default=20.0,
                        help="stop repeating a case once it has spent this long (at least 3 runs)")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                        help="run the forwards under CPU autocast to this dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each case")
    parser.add_argument("--memory-cap-gib", type=float, default=6.0,
                        help="address-space cap per case above its set-up size; beyond it a case is OOM")
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds before a case is killed")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results to this file")
    parser.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: rebuild one report from the --json files of earlier runs")
    return parser.parse_args(argv)


def _pick(value: str | None, allowed: Iterable[str], default: Iterable[str], what: str) -> list[str]:
    allowed = list(allowed)
    if value is None:
        return list(default)
    picked = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in picked if item not in allowed]
    if unknown or not picked:
        raise ValueError(f"--{what}: expected a comma-separated subset of {allowed}, got {value!r}")
    return picked


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from:
        loaded = [load_results(path) for path in args.report_from]
        text = report([header for header, _ in loaded], [r for _, results in loaded for r in results])
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return 0
    peers = installed_peers()
    shapes = _pick(args.shapes, SHAPES, QUICK["shapes"] if args.quick else SHAPES, "shapes")
    modes = _pick(args.modes, _peers.MODES, QUICK["modes"] if args.quick else _peers.MODES, "modes")
    impls = _pick(args.impls, IMPLS, ["nlnet", "explicit", *peers], "impls")
    missing = [impl for impl in impls if impl in _peers.PEERS and impl not in peers]
    if missing:
        raise ValueError(f"--impls names peers that are not installed: {missing}; pip install 'nlnet[bench]'")
    repeats = args.repeats or (QUICK["repeats"] if args.quick else 5)
    if repeats < 1 or args.threads < 1 or args.memory_cap_gib <= 0:
        raise ValueError("--repeats and --threads must be ≥ 1 and --memory-cap-gib > 0")
    options = {"threads": args.threads, "repeats": repeats, "case_seconds": args.case_seconds,
               "memory_cap_gib": args.memory_cap_gib, "case_timeout": args.case_timeout, "autocast": args.autocast}

    started, version = time.time(), block_version()
    command = "python benchmarks/block.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    def header(finished: bool) -> str:
        took = f"{math.ceil(time.time() - started)} s in all" if finished else "partial results of a run"
        return f"Command: `{command.strip()}`\n\nMachine: {environment(options)}; {version}; {took}."

    def save(results: list[Result], finished: bool = False) -> None:
        if args.json:
            saved = {"header": header(finished), "results": [dataclasses.asdict(r) for r in results]}
            args.json.write_text(json.dumps(saved, indent=1))

    results = run_all(plan([SHAPES[name] for name in shapes], modes, impls), options, on_group=save)
    save(results, finished=True)
    text = report([header(finished=True)], results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
