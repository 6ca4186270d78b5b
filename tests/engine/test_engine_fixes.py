"""Single-process checks of the training engine's device handling: CPU resume load, uint8 pinned loaders,
persistent workers, CUDA backend flags, chunked test views and the log-period loss / finite check."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

import nlnet.engine.train as train_module
from nlnet.engine.checkpoint import checkpoint_path
from nlnet.engine.distributed import DistContext, configure_backends
from nlnet.engine.evaluate import build_eval_loader, video_scores
from nlnet.engine.train import _Run, build_model, train

CPU = DistContext(0, 1, 0, torch.device("cpu"), True, "none")


def _cfg(video_set, tiny_recipe, out, **overrides):
    return train_module.resolve_builtin(OmegaConf.create(tiny_recipe(video_set, out, **overrides)))


def test_resume_reads_the_checkpoint_on_the_cpu_whatever_the_compute_device(tmp_path, video_set, tiny_recipe):
    # A finished run resumed with a non-CPU compute device: the loop has nothing left to do, so only the
    # checkpoint load runs. Loading with map_location=<compute device> put the RNG states there and NumPy's
    # could not be rebuilt (TypeError on CUDA; "meta" tensors show it without a GPU).
    cfg = _cfg(video_set, tiny_recipe, tmp_path / "run", train__max_iter=2, train__precise_bn=False)
    train(cfg, device="cpu")
    run = _Run(cfg, CPU)
    run.ctx = dataclasses.replace(CPU, device=torch.device("meta"))
    result = run.run(checkpoint_path(tmp_path / "run", 2))
    assert result["iteration"] == 2


def test_loaders_send_uint8_clips_and_only_the_training_loader_keeps_its_workers(tmp_path, video_set, tiny_recipe):
    cfg = _cfg(video_set, tiny_recipe, tmp_path / "run", train__num_workers=2, train__eval_period=2)
    run = _Run(cfg, CPU)
    assert run.loader.persistent_workers
    assert not run.bn_loader.persistent_workers and not run.val_loader.persistent_workers
    assert not run.loader.pin_memory  # nothing to pin for on the CPU

    plain = _Run(_cfg(video_set, tiny_recipe, tmp_path / "plain"), CPU)
    batch = next(iter(plain.loader))
    assert batch["clip"].dtype == torch.uint8 and batch["clip"].shape == (2, 3, 4, 32, 32)


def test_a_loader_built_for_cuda_pins_memory(tmp_path, video_set, tiny_recipe):
    cuda = dataclasses.replace(CPU, device=torch.device("cuda", 0))  # only the flag is looked at, no GPU needed
    loader = build_eval_loader(_cfg(video_set, tiny_recipe, tmp_path / "run"), "val", cuda)
    assert loader.pin_memory and not loader.persistent_workers
    assert not build_eval_loader(_cfg(video_set, tiny_recipe, tmp_path / "run"), "val", CPU).pin_memory


def test_cudnn_benchmark_and_tf32_are_set_for_cuda_only():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        configure_backends("cpu", cudnn_benchmark=True, tf32=True)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        configure_backends(torch.device("cuda", 0), cudnn_benchmark=True, tf32=True)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("multi_label", [False, True])
def test_views_in_chunks_score_like_all_views_at_once(tmp_path, video_set, tiny_recipe, multi_label):
    model = build_model(_cfg(video_set, tiny_recipe, tmp_path).model).eval()
    pixels = torch.randint(0, 256, (2, 6, 3, 4, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    floats = (pixels.double() - 114.75) / 57.375  # the recipe's normalisation, written out
    with torch.no_grad():
        expected = video_scores(model, floats.float(), multi_label=multi_label)
        for chunk in (1, 4, 6, 100):
            got = video_scores(model, pixels, multi_label=multi_label, view_chunk=chunk, mean=114.75, std=57.375)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="need the normalisation mean and std"):
        video_scores(model, pixels, multi_label=multi_label)


def _losses(path):
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {r["iter"]: r["loss"] for r in records if r["event"] == "train"}


def test_the_logged_loss_is_the_mean_over_the_log_period(tmp_path, video_set, tiny_recipe, one_thread):
    common = {"train__max_iter": 4, "train__precise_bn": False, "train__checkpoint_period": 4}
    train(_cfg(video_set, tiny_recipe, tmp_path / "every", train__log_period=1, **common), device="cpu")
    train(_cfg(video_set, tiny_recipe, tmp_path / "pairs", train__log_period=2, **common), device="cpu")
    every, pairs = _losses(tmp_path / "every" / "metrics.jsonl"), _losses(tmp_path / "pairs" / "metrics.jsonl")
    assert sorted(pairs) == [2, 4]
    assert pairs[2] == pytest.approx((every[1] + every[2]) / 2, rel=1e-12)
    assert pairs[4] == pytest.approx((every[3] + every[4]) / 2, rel=1e-12)


def test_a_nan_loss_in_the_middle_of_a_log_period_is_caught(tmp_path, video_set, tiny_recipe, monkeypatch):
    real_loss, calls = train_module._loss, []

    def loss(*args):
        calls.append(1)
        value = real_loss(*args)
        return value * torch.nan if len(calls) == 2 else value

    monkeypatch.setattr(train_module, "_loss", loss)
    cfg = _cfg(
        video_set, tiny_recipe, tmp_path / "run", train__max_iter=6, train__log_period=3, train__checkpoint_period=6
    )
    with pytest.raises(FloatingPointError, match=r"non-finite losses \(over all processes\) in iterations 1-3"):
        train(cfg, device="cpu")
    assert len(calls) == 3  # found at the log step, not later
    # A checkpoint inside the period checks first: the diverged weights are not saved.
    calls.clear()
    cfg = _cfg(
        video_set, tiny_recipe, tmp_path / "save", train__max_iter=6, train__log_period=3, train__checkpoint_period=2
    )
    with pytest.raises(FloatingPointError, match="iterations 1-2"):
        train(cfg, device="cpu")
    assert not list((tmp_path / "save").glob("checkpoint_*.pt"))
