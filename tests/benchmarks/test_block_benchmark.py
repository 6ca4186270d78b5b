"""benchmarks/block.py: every peer, loaded with an nlnet block's weights, computes the block's function, and
the measuring machinery (fresh processes, saved-bytes counter, memory cap, verdicts) runs end to end."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _peers  # noqa: E402
import block as bench  # noqa: E402

from nlnet import NonLocalBlock  # noqa: E402

SPATIAL = {1: (16,), 2: (8, 12), 3: (2, 8, 8)}
PACKAGE = {"pytorchvideo": "pytorchvideo", "mmcv": "mmcv", "timm": "timm"}
SUPPORTED = [
    (impl, mode, dim)
    for impl in ("explicit", *_peers.PEERS)
    for mode in _peers.MODES
    for dim in (1, 2, 3)
    if (impl, dim) not in {("pytorchvideo", 1), ("pytorchvideo", 2), ("timm", 1), ("timm", 3)}
    and not (impl == "pytorchvideo" and mode in ("gaussian", "concatenation"))
    and not (impl == "timm" and mode != "embedded_gaussian")
]


def _pair(impl: str, mode: str, dim: int, channels: int = 32):
    config = _peers.nlnet_config(impl, mode, dim, channels)
    block = _peers.randomize_(NonLocalBlock(channels, dim=dim, mode=mode, **config), seed=3).train()
    return block, _peers.build(impl, block, mode=mode, dim=dim, config=config)


@pytest.mark.parametrize(("impl", "mode", "dim"), SUPPORTED)
def test_implementation_computes_the_block_function_with_its_weights(impl, mode, dim):
    if impl in PACKAGE:
        pytest.importorskip(PACKAGE[impl])
    block, other = _pair(impl, mode, dim)
    x = torch.randn(2, 32, *SPATIAL[dim], generator=torch.Generator().manual_seed(0))
    x_block, x_other = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_block, out_other = block(x_block), other(x_other)
    residual = (out_block - x).abs().max().item()
    assert residual > 0.5  # BN γ = 1: the output really depends on the attention
    torch.testing.assert_close(out_other, out_block, rtol=1e-4, atol=1e-4 * residual)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out_block.backward(upstream)
    if (impl, mode) == ("mmcv", "concatenation"):
        # mmcv 2.2 divides the ReLU output by M in place, which autograd then refuses to differentiate.
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out_other.backward(upstream)
        return
    out_other.backward(upstream)
    torch.testing.assert_close(x_other.grad, x_block.grad, rtol=1e-4, atol=1e-4 * x_block.grad.abs().max().item())


def test_a_peer_differs_when_nlnet_is_not_configured_like_it():
    pytest.importorskip("mmcv")
    # mmcv pools after φ and g; nlnet's reference configuration pools before: different functions.
    config = _peers.nlnet_config("nlnet", "embedded_gaussian", 3, 32)
    block = _peers.randomize_(NonLocalBlock(32, dim=3, **config), seed=3).train()
    peer = _peers.build("mmcv", block, mode="embedded_gaussian", dim=3, config=config)
    x = torch.randn(2, 32, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (peer(x) - block(x)).abs().max().item()
    assert difference > 10 * bench.TOLERANCE


@pytest.mark.parametrize(("impl", "mode", "dim"), [
    ("pytorchvideo", "gaussian", 3), ("pytorchvideo", "embedded_gaussian", 2), ("timm", "dot_product", 2),
    ("timm", "embedded_gaussian", 3),
])
def test_peer_limits_are_reported_not_guessed(impl, mode, dim):
    with pytest.raises(_peers.Unsupported):
        _peers.nlnet_config(impl, mode, dim, 32)


def _options(**overrides) -> dict:
    options = {"threads": 1, "repeats": 2, "case_seconds": 1.0, "memory_cap_gib": 1.0, "case_timeout": 120.0}
    return options | overrides


def test_run_all_measures_every_installed_implementation_in_fresh_processes():
    tiny = bench.Shape("tiny", "tiny clip", 3, 32, (2, 8, 8), 2, "paper")
    impls = ["nlnet", "explicit", *(peer for peer in bench.installed_peers() if peer == "mmcv")]
    groups = bench.plan([tiny], ["concatenation"], impls)
    results = bench.run_all(groups, _options())
    by_row = {(r.case.mode, r.case.row_name): r for r in results}
    for (mode, row), result in by_row.items():
        if result.status == "unsupported":
            assert row in _peers.PEERS
            continue
        if (mode, row) == ("concatenation", "mmcv"):
            assert result.status == "no_backward" and result.saved_bytes > 0, result.message
            continue
        assert result.status == "ok", (mode, row, result.message)
        assert len(result.times_ms) == 2 and result.time_ms > 0
        assert result.saved_bytes > 0 and result.peak_bytes >= 0
        if row != "nlnet" and not row.startswith("nlnet≡"):
            assert result.max_diff <= bench.TOLERANCE * 10
    assert by_row["concatenation", "nlnet"].saved_bytes < by_row["concatenation", "explicit"].saved_bytes
    table = bench.table(results)
    assert table.count("\n") == sum(r.status != "unsupported" for r in results) + 1
    assert any("saved ≤ 0.75× explicit" in line for line in bench.verdicts(results))
    # --json / --report-from round trip
    assert [bench._result_from_dict(dataclasses.asdict(r)) for r in results] == results


def test_autocast_option_runs_the_forward_in_bfloat16():
    tiny = bench.Shape("tiny", "tiny clip", 3, 32, (2, 8, 8), 2, "paper")
    groups = bench.plan([tiny], ["embedded_gaussian"], ["explicit"])
    (full,) = bench.run_all(groups, _options(repeats=1))
    (half,) = bench.run_all(groups, _options(repeats=1, autocast="bf16"))
    assert full.status == half.status == "ok", (full.message, half.message)
    # The explicit form keeps its projections and the bmm operands in bfloat16: fewer bytes, same tensors.
    assert half.saved_bytes < full.saved_bytes
    assert "autocast bf16" in bench.environment(_options(autocast="bf16"))


def test_a_case_over_the_memory_cap_is_reported_as_out_of_memory():
    pytest.importorskip("mmcv")
    # mmcv's concatenation builds (B, 2C', N, M) = 2·32·4096·1024 floats = 1 GiB; nlnet needs ~50 MiB.
    shape = bench.Shape("wide", "wide frame", 3, 32, (1, 64, 64), 2, "paper")
    groups = bench.plan([shape], ["concatenation"], ["nlnet", "mmcv"])
    results = bench.run_all(groups, _options(memory_cap_gib=0.25))
    status = {r.case.row_name: r.status for r in results}
    assert status == {"nlnet": "ok", "mmcv": "oom", "nlnet≡mmcv": "ok"}
    verdicts = bench.verdicts(results)
    assert any(line.startswith("PASS concatenation runs where mmcv is OOM") for line in verdicts)


def test_filters_reject_unknown_names():
    with pytest.raises(ValueError, match="--shapes"):
        bench._pick("res3_b2,res9", bench.SHAPES, bench.SHAPES, "shapes")
    assert bench._pick("dot_product", _peers.MODES, _peers.MODES, "modes") == ["dot_product"]


@pytest.mark.slow
def test_quick_run_writes_a_report(tmp_path):
    report = tmp_path / "block.md"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "block.py"), "--quick", "--markdown", str(report)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    text = report.read_text()
    assert "| NL-I3D res4 C=1024 4×14×14 B=2 | embedded_gaussian | nlnet |" in text
    assert "Targets:" in text and text in completed.stdout
