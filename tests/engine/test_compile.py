"""``torch.compile`` and the training loop: the non-local block traces as one graph, and ``train.compile=true``
trains through the compiled module while checkpoints keep the uncompiled state-dict keys.

The default tests compile with ``backend="aot_eager"``: Dynamo and AOTAutograd trace exactly what inductor
would receive (graph breaks included, forward and backward) without generating C++ code, which takes minutes
on a CPU. Warming Dynamo up still costs ~10 s per process.
"""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

import nlnet.engine.train as train_module
from nlnet.engine.config import DEFAULTS, validate_config
from nlnet.engine.train import train
from nlnet.models import create


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("nl_c2d_r50", stage_blocks=(1, 1, 1, 1), base_width=8, nonlocal_blocks={"res3": [0]},
                   num_classes=3, dropout=0.0)
    # At init the block is the identity (γ = 0 in its BN); a non-zero γ makes its attention reach the output
    # and its gradients, so that the comparison below covers the block's forward and backward.
    for name, module in model.named_modules():
        if name.endswith("nonlocal_block.norm"):
            torch.nn.init.ones_(module.weight)
    # Dropout is off because compiled code draws its masks from another random stream than eager.
    return model.train()


def _forward_backward(run: torch.nn.Module, model: torch.nn.Module,
                      clip: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``run(clip)`` and the gradients it leaves on ``model``'s parameters (``run`` may wrap it)."""
    logits = run(clip)
    logits.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def test_the_whole_tiny_model_compiles_as_one_graph_and_matches_eager(one_thread):
    eager, compiled_source = _tiny_model(), _tiny_model()
    assert any("nonlocal_block" in name for name, _ in eager.named_modules())
    clip = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    # fullgraph=True turns any graph break (a custom autograd Function Dynamo cannot trace, a data-dependent
    # branch, a host read) into an error instead of a silent fall-back to eager for that piece.
    compiled = torch.compile(compiled_source, fullgraph=True, backend="aot_eager")
    logits, grads = _forward_backward(compiled, compiled_source, clip)
    eager_logits, eager_grads = _forward_backward(eager, eager, clip)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # Train mode reached the BN running statistics through the compiled graph as in eager.
    torch.testing.assert_close(compiled_source.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-5)


def test_train_compile_must_be_a_boolean():
    cfg = OmegaConf.create(DEFAULTS)
    assert cfg.train.compile is False
    cfg.train.compile = "yes"
    with pytest.raises(ValueError, match="train.compile must be true or false, got 'yes'"):
        validate_config(cfg)


def test_a_compiled_run_writes_checkpoints_with_the_eager_keys(tmp_path, video_set, tiny_recipe, one_thread,
                                                              monkeypatch):
    compiled_modules: list[torch.nn.Module] = []
    real_compile = torch.compile

    def aot_eager_compile(module: torch.nn.Module, **kwargs) -> torch.nn.Module:
        compiled_modules.append(module)
        return real_compile(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(train_module.torch, "compile", functools.wraps(real_compile)(aot_eager_compile))
    states = {}
    for compile_model in (False, True):
        cfg = tiny_recipe(video_set, tmp_path / str(compile_model), train__compile=compile_model,
                          train__max_iter=2, train__precise_bn_batches=1,
                          model__dropout=0.0, data__num_frames=8)
        result = train(cfg, device="cpu")
        states[compile_model] = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["model"]
    assert len(compiled_modules) == 1  # only the compiled run went through torch.compile
    assert list(states[True]) == list(states[False])
    assert not any(key.startswith("_orig_mod.") for key in states[True])
    # Same seed, data and weights: two steps through the compiled graph land where eager does.
    for key, value in states[True].items():
        torch.testing.assert_close(value, states[False][key], rtol=1e-3, atol=1e-4, msg=key)
