"""Whole video models on the meta device: full-size shapes through the non-CPU code paths, and the SDPA calls.

On ``torch.device("meta")`` nothing is computed or allocated, so full 32 x 224 x 224 clips cost only the Python
work of the graph; and since the non-local block picks its kernels by ``device.type == "cpu"``, meta takes the
paths CUDA takes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from nlnet.models import create, nonlocal_blocks

BATCH = 2
CLIP_32X2 = (3, 32, 224, 224)
# (T, H, W) of the non-local inputs of a 32 x 224 x 224 clip (paper Table 1): res3 4 x 28 x 28, res4 4 x 14 x 14.
GRIDS = {"res3": (4, 28, 28), "res4": (4, 14, 14)}


def _meta_model(name: str, **overrides) -> torch.nn.Module:
    with torch.device("meta"):
        return create(name, **overrides)


def _capture_block_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    for key, block in nonlocal_blocks(model).items():
        block.register_forward_pre_hook(lambda module, args, key=key: inputs.__setitem__(key, args[0].detach()))
    return inputs


_MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
# Every mode with global attention, every extent and temporal groups run by default (about 4 s each on meta);
# the remaining mode x extent pairs are slow.
_DEFAULT_SETTINGS = [(mode, "spacetime", None) for mode in _MODES] + [
    ("embedded_gaussian", "space", None),
    ("embedded_gaussian", "time", None),
    ("gaussian", "spacetime", {"res3": 2}),
]
_SLOW_SETTINGS = [
    pytest.param(mode, extent, groups, marks=pytest.mark.slow)
    for mode, extent, groups in [(mode, extent, None) for mode in _MODES for extent in ("space", "time")]
    + [(mode, "spacetime", {"res3": 2}) for mode in ("embedded_gaussian", "dot_product")]
    if (mode, extent, groups) not in _DEFAULT_SETTINGS
]


@pytest.mark.parametrize(("mode", "extent", "groups"), _DEFAULT_SETTINGS + _SLOW_SETTINGS)
def test_full_size_forward_backward_and_attention_on_meta(mode: str, extent: str, groups: dict | None) -> None:
    model = _meta_model("nl_i3d_r50", nonlocal_mode=mode, nonlocal_extent=extent, nonlocal_temporal_groups=groups)
    inputs = _capture_block_inputs(model)
    logits = model(torch.empty(BATCH, *CLIP_32X2, device="meta"))
    assert logits.shape == (BATCH, 400) and logits.dtype == torch.float32 and logits.is_meta
    logits.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.shape == parameter.shape and parameter.grad.dtype == parameter.dtype, name

    blocks = nonlocal_blocks(model)
    assert list(inputs) == list(blocks)  # every block ran
    for key, block in blocks.items():
        stage = key.split(".")[0]
        x = inputs[key]
        assert tuple(x.shape) == (BATCH, block.in_channels, *GRIDS[stage])
        weights = block.attention(x)
        t, h, w = GRIDS[stage]
        # Keys are 1x2x2 max-pooled, except for the time extent, whose keys are the query's own position in every
        # frame (pooling would mix positions). attention() is the full (B, N, M) matrix either way: extents and
        # groups leave zeros outside each query's keys.
        queries, keys = t * h * w, (t * h * w if extent == "time" else t * (h // 2) * (w // 2))
        assert weights.shape == (BATCH, queries, keys) and weights.dtype == torch.float32


@pytest.mark.parametrize(("clip", "frames"), [("32x2", 32), ("8x8", 8)])
def test_nl_c2d_r50_backward_on_meta_in_bfloat16(clip: str, frames: int) -> None:
    model = _meta_model("nl_c2d_r50", clip=clip).to(torch.bfloat16)
    logits = model(torch.empty(BATCH, 3, frames, 224, 224, device="meta", dtype=torch.bfloat16))
    assert logits.shape == (BATCH, 400) and logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


class _RecordAttention(TorchFunctionMode):
    """Records the (query, key, value, kwargs) of every scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value, *rest = args
            assert not rest, "positional attn_mask / dropout / is_causal"
            self.calls.append((query, key, value, dict(kwargs)))
        return func(*args, **kwargs)


def _record(model: torch.nn.Module, clip: torch.Tensor) -> list:
    with _RecordAttention() as recorder:
        model(clip).float().sum().backward()
    return recorder.calls


# The CUDA kernels' input constraints, PyTorch aten/src/ATen/native/transformers/cuda/sdp_utils.cpp:
# 4-D (B, H, N, d) inputs of one dtype, last dimension contiguous (check_last_dim_stride_equals_1), no mask, no
# dropout; memory-efficient: float16/bfloat16/float32, d a multiple of 8 (16-bit) or 4 (float32)
# (check_head_dim_size_mem_efficient); flash: float16/bfloat16 only and d <= 256, a multiple of 8
# (check_head_dim_size_flash).
def _memory_efficient_ok(query, key, value, kwargs) -> bool:
    tensors = (query, key, value)
    alignment = 4 if query.dtype == torch.float32 else 8
    return (
        all(t.dim() == 4 and t.dtype == query.dtype and t.stride(-1) == 1 for t in tensors)
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and query.shape[-1] == key.shape[-1]
        and all(t.shape[-1] % alignment == 0 for t in tensors)
        and kwargs.get("attn_mask") is None
        and not kwargs.get("dropout_p")
        and not kwargs.get("is_causal")
    )


def _flash_ok(query, key, value, kwargs) -> bool:
    return (
        _memory_efficient_ok(query, key, value, kwargs)
        and query.dtype in (torch.float16, torch.bfloat16)
        and all(t.shape[-1] <= 256 and t.shape[-1] % 8 == 0 for t in (query, key, value))
    )


@pytest.mark.parametrize(
    ("name", "clip", "frames"), [("nl_i3d_r50", "32x2", 32), ("nl_c2d_r50", "32x2", 32), ("nl_c2d_r50", "8x8", 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_models_reach_cuda_attention_kernels(name: str, clip: str, frames: int, dtype: torch.dtype) -> None:
    model = _meta_model(name, clip=clip).to(dtype)
    calls = _record(model, torch.empty(BATCH, 3, frames, 224, 224, device="meta", dtype=dtype))
    # Embedded Gaussian (the paper's default): each of the 5 blocks sends its (B, 1, N, d) queries to SDPA once;
    # d = C / 2 is 256 at res3 (512 channels) and 512 at res4 (1024 channels), N = T·H·W, M = T·H/2·W/2.
    assert len(calls) == 5
    shapes = [(tuple(q.shape), tuple(k.shape)) for q, k, _, _ in calls]
    assert shapes == [((BATCH, 1, 4 * 28 * 28, 256), (BATCH, 1, 4 * 14 * 14, 256))] * 2 + [
        ((BATCH, 1, 4 * 14 * 14, 512), (BATCH, 1, 4 * 7 * 7, 512))
    ] * 3
    for query, key, value, kwargs in calls:
        assert query.dtype == dtype and _memory_efficient_ok(query, key, value, kwargs)
        # The flash kernel takes res3's 16-bit calls; res4's 512-wide heads exceed its 256 limit.
        assert _flash_ok(query, key, value, kwargs) == (dtype == torch.bfloat16 and query.shape[-1] == 256)


@pytest.mark.parametrize("stage", ["res3", "res4"])
def test_gaussian_blocks_avoid_sdpa_because_their_values_are_narrower(stage: str) -> None:
    # Gaussian mode compares the raw C channels but aggregates the C/2-channel g(x): SDPA needs one head width
    # for queries and values, so softmax_attention takes its own kernel (explicit or chunked), never SDPA.
    channels = {"res3": 512, "res4": 1024}[stage]
    with torch.device("meta"):
        model = create("nl_i3d_r50", nonlocal_mode="gaussian", nonlocal_blocks={stage: [1]})
    block = nonlocal_blocks(model)[f"{stage}.1.nonlocal_block"]
    assert block.in_channels == channels
    x = torch.empty(BATCH, channels, *GRIDS[stage], device="meta", requires_grad=True)
    with _RecordAttention() as recorder:
        block(x).sum().backward()
    assert recorder.calls == [] and x.grad.shape == x.shape
