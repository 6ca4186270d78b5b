"""Scenarios run by ``torchrun --nproc_per_node=2`` (gloo, CPU) from ``test_distributed.py``.

``python dist_scenarios.py OUT_DIR PLAN.json``: PLAN is a list of ``[scenario, [args...]]`` run in order in the same
two processes (one launch: starting interpreters that import torch is the slow part). For each scenario each writes
``OUT_DIR/<scenario>.rank<r>.json`` with what it saw, or the type and message of the exception it stopped with.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

import nlnet.engine.train as train_module
from nlnet.data.transforms import normalize_clips
from nlnet.engine.checkpoint import resolve_resume
from nlnet.engine.distributed import all_gather_objects, cleanup_distributed, setup_distributed
from nlnet.engine.precise_bn import agreed_clips, update_bn_stats
from nlnet.engine.train import train


def nan_on_rank_one(args: list[str], rank: int) -> dict:
    """Trains the recipe file args[0]; rank 1's second loss is NaN, rank 0's losses are all finite."""
    real_loss, calls = train_module._loss, []

    def loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
        calls.append(1)
        value = real_loss(logits, labels, multi_label)
        return value * torch.nan if rank == 1 and len(calls) == 2 else value

    train_module._loss = loss
    train(OmegaConf.load(args[0]), device="cpu")
    return {"finished": True}


def resume_choice(args: list[str], rank: int) -> dict:
    """Every rank looks at its own folder args[rank]; rank 0's view decides."""
    chosen = resolve_resume(args[rank], True)
    try:
        resolve_resume(args[rank], False)
        fresh = "allowed"
    except FileExistsError as error:
        fresh = f"FileExistsError: {error}"
    return {"chosen": str(chosen), "fresh": fresh}


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1), nn.BatchNorm3d(2))


def precise_bn_with_an_empty_batch(args: list[str], rank: int) -> dict:
    """Four uint8 batches per rank; rank 1's second one is empty (its videos were unreadable)."""
    generator = torch.Generator().manual_seed(10 + rank)
    shape = (2, 3, 2, 4, 4)
    batches = [{"clip": torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)} for _ in range(4)]
    if rank == 1:
        batches[1] = {"clip": None}
    model = _bn_net().train()

    def model_input(batch: dict, device: torch.device) -> torch.Tensor:
        return normalize_clips(batch["clip"].to(device), 114.75, 57.375)

    used = update_bn_stats(model, agreed_clips(batches, torch.device("cpu"), model_input), 10)
    return {"used": used, "running_mean": model[1].running_mean.tolist()}


def precise_bn_exact_nl_i3d(args: list[str], rank: int) -> dict:
    """Precise BN of a small NL-I3D over two ranks against statistics gathered from plain forwards."""
    from test_precise_bn import captured_inputs, small_nl_i3d

    model = small_nl_i3d()
    generator = torch.Generator().manual_seed(20 + rank)
    clips = [torch.randn(2, 3, 8, 32, 32, generator=generator) for _ in range(2)]
    inputs = captured_inputs(model, clips)  # {layer name: (N_i, C) per-channel samples of this rank}
    update_bn_stats(model, clips, len(clips))
    everything = all_gather_objects(inputs)
    errors = {}
    for name, layer in model.named_modules():
        if name in inputs:
            samples = torch.cat([part[name] for part in everything])
            var, mean = torch.var_mean(samples, dim=0, correction=1)
            errors[name] = max(
                (layer.running_mean.double() - mean).abs().max().item(),
                (layer.running_var.double() - var).abs().max().item(),
            )
    return {"errors": errors}


SCENARIOS = {
    "nan_on_rank_one": nan_on_rank_one,
    "resume_choice": resume_choice,
    "resume_choice_none": resume_choice,
    "precise_bn_with_an_empty_batch": precise_bn_with_an_empty_batch,
    "precise_bn_exact_nl_i3d": precise_bn_exact_nl_i3d,
}


def main() -> int:
    import os

    out, plan = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))
    rank = int(os.environ["RANK"])
    # One process group for every scenario: joining again after leaving one does not work under torchrun's store.
    # ``train`` joins the existing group and leaves it at its end, so it must come last in the plan.
    setup_distributed("cpu")
    for scenario, args in plan:
        try:
            result = SCENARIOS[scenario](args, rank)
        except Exception as error:
            result = {"error": type(error).__name__, "message": str(error), "trace": traceback.format_exc()}
        (out / f"{scenario}.rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
