"""NonLocalBlock against the paper's formulas, written out independently here in float64."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlnet import NonLocalBlock
from nlnet.engine.precise_bn import update_bn_stats

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
SHAPES = {1: (2, 6, 10), 2: (2, 6, 6, 8), 3: (2, 6, 4, 6, 4)}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference(block: NonLocalBlock, x: torch.Tensor, memory: torch.Tensor | None = None):
    """The block's output and weights from the formulas, with torch's own conv, max-pool and softmax.

    Returns (z, weights) with z = x + BN(W_z y) (batch statistics, as in training) and weights (B, N, M).
    """
    out, weights = reference_projection(block, x, memory)
    if block.norm is not None:
        dims = [0] + list(range(2, out.dim()))
        mean = out.mean(dims, keepdim=True)
        var = out.var(dims, keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * block.dim
        out = (out - mean) / torch.sqrt(var + block.norm.eps) * block.norm.weight.view(shape)
        out = out + block.norm.bias.view(shape)
    return x + out, weights


def reference_projection(block: NonLocalBlock, x: torch.Tensor, memory: torch.Tensor | None = None):
    """(W_z y + b_z, weights): the BN's input (B, C, *S) and the weights (B, N, M), from the formulas."""
    conv = CONV[block.dim]
    source = x if memory is None else memory
    kernel = block.pool_kernel

    def pool(t):
        return MAX_POOL[block.dim](t, kernel, kernel) if kernel else t

    def embed(module, t):
        return conv(t, module.weight, module.bias)

    def keys_of(module):
        if block.pool_position == "before":
            return embed(module, pool(source))
        return pool(embed(module, source))

    values = keys_of(block.g).flatten(2)  # (B, d, M)
    x_flat = x.flatten(2)
    if block.mode == "gaussian":
        affinity = torch.einsum("bcn,bcm->bnm", x_flat, pool(source).flatten(2))
        weights = torch.softmax(affinity * block.scale_factor, dim=-1)
    else:
        theta = embed(block.theta, x).flatten(2)
        phi = keys_of(block.phi).flatten(2)
        if block.mode == "embedded_gaussian":
            weights = torch.softmax(torch.einsum("bdn,bdm->bnm", theta, phi) * block.scale_factor, dim=-1)
        elif block.mode == "dot_product":
            weights = torch.einsum("bdn,bdm->bnm", theta, phi) / phi.shape[-1]
        else:
            w = block.concat.weight[0]
            d = theta.shape[1]
            # w_fᵀ [θ_i, φ_j] for every pair, literally.
            pairs = torch.cat(
                [theta[:, :, :, None].expand(-1, -1, -1, phi.shape[-1]),
                 phi[:, :, None, :].expand(-1, -1, theta.shape[-1], -1)], dim=1,
            )
            weights = torch.relu(torch.einsum("c,bcnm->bnm", w, pairs)) / phi.shape[-1]
            assert pairs.shape[1] == 2 * d
    y = torch.einsum("bnm,bdm->bdn", weights, values).reshape(x.shape[0], -1, *x.shape[2:])
    return conv(y, block.out.weight, block.out.bias), weights


def randomised(block: NonLocalBlock) -> NonLocalBlock:
    """A float64 copy whose output depends on the attention (γ and W_z away from their zero init)."""
    block = block.double()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return block


# Every mode × dim × pooling (without pooling "before" and "after" are the same function); norm and memory
# alternate over the cases so that each combination of them meets every mode and every dim.
POOLINGS = (("default", "before"), ("default", "after"), (None, "before"))
CASES = [
    (mode, dim, pool, position, ("bn", None)[i % 2], bool((i // 2) % 2))
    for i, (mode, dim, (pool, position)) in enumerate(itertools.product(MODES, (1, 2, 3), POOLINGS))
]
assert {case[4:] for case in CASES} == {("bn", False), ("bn", True), (None, False), (None, True)}


@pytest.mark.parametrize("mode,dim,pool,position,norm,use_memory", CASES)
def test_forward_and_attention_match_the_formulas(mode, dim, pool, position, norm, use_memory):
    memory_channels = 6 if mode == "gaussian" else 5
    block = randomised(NonLocalBlock(
        6, 4, dim=dim, mode=mode, pool=pool, pool_position=position, norm=norm,
        memory_channels=memory_channels if use_memory else None,
    ))
    torch.manual_seed(0)
    x = torch.randn(*SHAPES[dim], dtype=torch.float64)
    memory = None
    if use_memory:
        memory_shape = list(SHAPES[dim])
        memory_shape[1] = memory_channels
        memory_shape[-1] += 2
        memory = torch.randn(*memory_shape, dtype=torch.float64)
    expected, expected_weights = reference(block, x, memory)
    for impl in ("auto", "explicit"):
        block.impl = impl
        got = block(x, memory)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(block.attention(x, memory), expected_weights, rtol=1e-6, atol=1e-12)


def test_softmax_scale_default_and_explicit_factor():
    assert NonLocalBlock(8, 4, mode="embedded_gaussian").scale_factor == pytest.approx(4**-0.5)
    assert NonLocalBlock(8, 4, mode="gaussian").scale_factor == pytest.approx(8**-0.5)
    assert NonLocalBlock(8, mode="embedded_gaussian", scale=False).scale_factor == 1.0
    assert NonLocalBlock(8, scale=0.3).scale_factor == 0.3


@pytest.mark.parametrize("dim", (1, 2, 3))
@pytest.mark.parametrize("norm", ("bn", None))
def test_identity_at_init(dim, norm):
    torch.manual_seed(0)
    x = torch.randn(*SHAPES[dim]) * 3
    for mode in MODES:
        block = NonLocalBlock(6, dim=dim, mode=mode, norm=norm)
        assert torch.equal(block(x), x)
        assert torch.equal(block.eval()(x), x)


def test_parameters_and_names():
    block = NonLocalBlock(512, mode="embedded_gaussian")
    names = {name for name, _ in block.named_parameters()}
    assert names == {f"{m}.{p}" for m in ("theta", "phi", "g", "out") for p in ("weight", "bias")} | {
        "norm.weight", "norm.bias"}
    # 3 × (512·256 + 256) + (256·512 + 512) + 2·512: the res3 block of the official models (0.527M).
    assert sum(p.numel() for p in block.parameters()) == 3 * (512 * 256 + 256) + 256 * 512 + 512 + 1024
    assert not hasattr(NonLocalBlock(8, mode="gaussian"), "theta")
    assert NonLocalBlock(8, mode="concatenation").concat.weight.shape == (1, 8)
    assert NonLocalBlock(8, norm=None).norm is None
    assert NonLocalBlock(8, dim=3).pool_kernel == (1, 2, 2)
    assert NonLocalBlock(8, dim=2).pool_kernel == (2, 2)
    assert NonLocalBlock(8, dim=1).pool_kernel == (2,)
    assert NonLocalBlock(8, dim=3, pool=None).pool_kernel is None


@pytest.mark.parametrize("mode", MODES)
def test_space_extent_is_a_2d_block_on_every_frame(mode):
    block3d = randomised(NonLocalBlock(6, 4, dim=3, mode=mode, extent="space", norm=None))
    block2d = randomised(NonLocalBlock(6, 4, dim=2, mode=mode, norm=None))
    block2d.load_state_dict({k: v.reshape(block2d.state_dict()[k].shape) for k, v in block3d.state_dict().items()})
    x = torch.randn(2, 6, 3, 6, 4, dtype=torch.float64)
    frames = x.transpose(1, 2).reshape(6, 6, 6, 4)
    expected = block2d(frames).reshape(2, 3, 6, 6, 4).transpose(1, 2)
    torch.testing.assert_close(block3d(x), expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_time_extent_is_a_1d_block_at_every_place(mode):
    block3d = randomised(NonLocalBlock(6, 4, dim=3, mode=mode, extent="time", pool=(2, 2, 2), norm=None))
    assert block3d.pool_kernel == (2, 1, 1)
    block1d = randomised(NonLocalBlock(6, 4, dim=1, mode=mode, pool=2, norm=None))
    block1d.load_state_dict({k: v.reshape(block1d.state_dict()[k].shape) for k, v in block3d.state_dict().items()})
    x = torch.randn(2, 6, 4, 3, 2, dtype=torch.float64)
    sequences = x.permute(0, 3, 4, 1, 2).reshape(12, 6, 4)
    expected = block1d(sequences).reshape(2, 3, 2, 6, 4).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(block3d(x), expected, rtol=1e-7, atol=1e-10)


def test_temporal_groups_attend_within_consecutive_frames():
    grouped = randomised(NonLocalBlock(6, 4, dim=3, temporal_groups=2, norm=None))
    whole = randomised(NonLocalBlock(6, 4, dim=3, norm=None))
    whole.load_state_dict(grouped.state_dict())
    x = torch.randn(1, 6, 4, 4, 4, dtype=torch.float64)
    expected = torch.cat([whole(x[:, :, :2]), whole(x[:, :, 2:])], dim=2)
    torch.testing.assert_close(grouped(x), expected, rtol=1e-7, atol=1e-10)
    weights = grouped.attention(x)
    assert weights.shape == (1, 64, 16)
    assert torch.count_nonzero(weights[:, :32, 8:]) == 0 and torch.count_nonzero(weights[:, 32:, :8]) == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 64, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dim", "size"),
    [
        (2, (4, 4)),  # 4 keys for 4 channels: BN recomputes W_z y in backward
        (2, (2, 2)),  # 1 key: W_z y is kept; few keys: the recomputing softmax / product kernels
        (1, (6,)),
        (3, (2, 4, 4)),
    ],
)
def test_gradcheck_fast_paths(mode, dim, size):
    block = randomised(NonLocalBlock(4, 3, dim=dim, mode=mode))
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    names, params = zip(*block.named_parameters(), strict=True)

    def run(x, *flat):
        return torch.func.functional_call(block, dict(zip(names, flat, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_fused_batch_norm_running_statistics_match_batchnorm():
    block = randomised(NonLocalBlock(6, 4, dim=3)).float()
    plain = NonLocalBlock(6, 4, dim=3, impl="explicit")
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, 6, 2, 4, 4)
    for _ in range(3):
        torch.testing.assert_close(block(x), plain(x), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block.norm, name), getattr(plain.norm, name))


# -- training-mode BN: precise BN and hooks, degenerate batches ------------------------------------------------
# With at least C/2 keys (and in every concatenation block) a training block under grad computes BN(W_z y) in one
# fused kernel instead of calling its BN module; wherever the module's call would do more (hooks) or there is
# nothing to save (no_grad), the module itself must run.
POOLINGS_2D = [(None, "before"), ("default", "before"), ("default", "after")]


@pytest.mark.parametrize("pool,position", POOLINGS_2D)
@pytest.mark.parametrize("mode", MODES)
def test_precise_bn_sets_the_exact_statistics_of_the_bn_input(mode, pool, position):
    block = randomised(NonLocalBlock(6, 4, dim=2, mode=mode, pool=pool, pool_position=position))
    generator = torch.Generator().manual_seed(0)
    clips = [torch.randn(2, 6, 6, 8, generator=generator, dtype=torch.float64) for _ in range(3)]  # ≥ 12 keys
    # The BN input W_z y + b of every clip, from the formulas; its exact mean and unbiased variance per channel.
    inputs = torch.cat([reference_projection(block, clip)[0] for clip in clips])
    assert update_bn_stats(nn.Sequential(block).train(), clips, len(clips)) == len(clips)
    torch.testing.assert_close(block.norm.running_mean, inputs.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.norm.running_var, inputs.var((0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_hooks_on_the_norm_run_in_training_with_grad(mode):
    block = randomised(NonLocalBlock(6, 4, dim=2, mode=mode))
    x = torch.randn(2, 6, 6, 8, dtype=torch.float64, requires_grad=True)
    expected, bn_input = reference(block, x)[0], reference_projection(block, x)[0]
    seen, seen_globally = [], []
    handles = [
        block.norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0])),
        torch.nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: seen_globally.append(module) if module is block.norm else None
        ),
    ]
    try:
        out = block(x)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 1 and len(seen_globally) == 1
    torch.testing.assert_close(seen[0], bn_input)
    torch.testing.assert_close(out, expected)
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])


@pytest.mark.parametrize("grad", (True, False))
@pytest.mark.parametrize("mode", MODES)
def test_one_value_per_channel_in_training_raises_like_batchnorm(mode, grad):
    block = NonLocalBlock(2, dim=2, mode=mode, pool=None).train()
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(torch.randn(1, 2, 1, 1))
    assert torch.equal(block.norm.running_mean, torch.zeros(2)) and torch.equal(block.norm.running_var, torch.ones(2))


@pytest.mark.parametrize("train", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize(
    "size,pool,position",
    [
        ((6, 8), "default", "before"),
        ((6, 8), "default", "after"),
        ((2, 2), None, "before"),
        ((2, 2), "default", "before"),
    ],
    ids=["many-keys-before", "many-keys-after", "4-keys-unpooled", "1-key"],
)
@pytest.mark.parametrize("mode", MODES)
def test_an_empty_batch_goes_forward_and_backward_like_batchnorm(mode, size, pool, position, train):
    # A Keypoint R-CNN head meets batch 0 on images without positive regions: nn.BatchNorm returns an empty batch,
    # counts it, and leaves its statistics.
    block = randomised(NonLocalBlock(6, 4, dim=2, mode=mode, pool=pool, pool_position=position)).train(train)
    explicit = copy.deepcopy(block)
    explicit.impl = "explicit"
    for module in (block, explicit):
        x = torch.empty(0, 6, *size, dtype=torch.float64, requires_grad=True)
        out = module(x)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is None or not p.grad.any() for p in module.parameters())
    for (name, ours), theirs in zip(block.norm.named_buffers(), explicit.norm.buffers(), strict=True):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("train", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("norm", ("bn", None))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_and_bfloat16_modules_keep_their_dtype(dtype, mode, norm, train):
    # No autocast: the pairwise part of a float16 module runs in float32 (float16 overflows), and the rest is
    # float16 again.
    block = randomised(NonLocalBlock(6, 4, dim=2, mode=mode, norm=norm)).float().train(train)
    low = copy.deepcopy(block).to(dtype)
    x = torch.randn(2, 6, 6, 8).to(dtype)
    x_low = x.clone().requires_grad_()
    out = low(x_low)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert x_low.grad.dtype == dtype
    assert all(p.grad.dtype == dtype for p in low.parameters() if p.grad is not None)
    expected = block(x.float())  # the float32 module on the same input
    scale = (expected - x.float()).abs().max()
    assert scale > 0.5
    assert (out.float() - expected).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("position", ("before", "after"))
@pytest.mark.parametrize("mode", MODES)
def test_deterministic_mode_gives_the_usual_gradients(mode, position, deterministic_algorithms):
    block = randomised(NonLocalBlock(6, 4, dim=3, mode=mode, pool_position=position))
    # Rounded post-ReLU values: windows with tied maxima, whose gradient goes where max_pool's backward sends it.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 2, 6, 8, generator=generator, dtype=torch.float64).round().clamp_min(0)
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)

    def output_and_grads():
        block.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        out = block(inputs)
        out.backward(upstream)
        return [out, inputs.grad, *(p.grad for p in block.parameters())]

    torch.use_deterministic_algorithms(True)
    deterministic = output_and_grads()
    torch.use_deterministic_algorithms(False)
    for got, expected in zip(deterministic, output_and_grads(), strict=True):
        assert torch.equal(got, expected)
    block.impl = "explicit"  # torch's max_pool and its backward
    torch.testing.assert_close(deterministic, output_and_grads(), rtol=1e-7, atol=1e-9)


# -- double backward -------------------------------------------------------------------------------------------
# Every lean kernel differentiates twice exactly, except scaled_dot_product_attention (embedded Gaussian with more
# keys than channels), whose backward has no derivative in torch: there it must raise, saying what to do.
SDPA_DOUBLE_BACKWARD = "double backward is not supported by NonLocalBlock's lean kernels.*impl='explicit'"


@pytest.mark.parametrize("keys", ("few", "many"))
@pytest.mark.parametrize("pool,position", POOLINGS_2D)
@pytest.mark.parametrize("mode", MODES)
def test_double_backward_is_exact_or_refused(mode, pool, position, keys):
    # C = 6, d = 3: few keys (2) take the recomputing kernels and keep W_z y; many (6 or 12) the others.
    size = {("few", None): (1, 2), ("few", "default"): (2, 4), ("many", None): (3, 4), ("many", "default"): (4, 6)}
    block = randomised(NonLocalBlock(6, 3, dim=2, mode=mode, pool=pool, pool_position=position))
    x = torch.randn(2, 6, *size[keys, pool], dtype=torch.float64, requires_grad=True)
    names, params = zip(*block.named_parameters(), strict=True)

    def run(x, *flat):
        return torch.func.functional_call(block, dict(zip(names, flat, strict=True)), (x,))

    block.impl = "explicit"
    assert torch.autograd.gradgradcheck(run, (x, *params), atol=1e-5, fast_mode=True)
    block.impl = "auto"
    if mode == "embedded_gaussian" and keys == "many":
        with pytest.raises(RuntimeError, match=SDPA_DOUBLE_BACKWARD):
            torch.autograd.gradgradcheck(run, (x, *params), atol=1e-5, fast_mode=True)
    else:
        assert torch.autograd.gradgradcheck(run, (x, *params), atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("mode", MODES)
def test_autocast_with_large_activations_stays_finite(mode, dtype):
    torch.manual_seed(0)
    block = NonLocalBlock(16, dim=2, mode=mode)
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
    x = torch.randn(2, 16, 8, 8) * 300
    reference_out = block(x)
    assert torch.isfinite(reference_out).all()
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)
    assert torch.isfinite(out).all()
    if dtype == torch.bfloat16:
        # float16 weight gradients may overflow like any float16 GEMM: that is GradScaler's job, not the block's.
        out.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_keeps_one_copy_of_each_weight_whatever_the_batch(mode):
    # Autocast casting a weight expanded over the batch would materialise (and keep) one copy per sample.
    block = NonLocalBlock(24, 8, dim=3, mode=mode)
    x = torch.randn(5, 24, 2, 4, 6, requires_grad=True)  # 48 queries, 12 keys: no activation is shaped like a weight
    weights = {tuple(p.flatten(1).shape) for p in block.parameters() if p.dim() > 1}
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.untyped_storage().nbytes() // tensor.element_size()))
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    weight_shapes = weights | {w[::-1] for w in weights}
    assert saved
    # Where a GEMM sees a (B, C_out, C_in) weight, it is a view of one copy.
    copied = [(shape, size) for shape, size in saved
              if shape[0] == 5 and shape[1:] in weight_shapes and size >= 5 * shape[1] * shape[2]]
    assert not copied, copied


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    block = randomised(NonLocalBlock(8, dim=3)).float()
    x = torch.randn(2, 8, 2, 4, 4, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    eager = block(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, x.grad)


def test_onnx_export_runs_in_the_onnx_reference_evaluator(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    block = randomised(NonLocalBlock(8, dim=2)).float().eval()
    x = torch.randn(1, 8, 6, 6)
    path = tmp_path / "block.onnx"
    torch.onnx.export(block, (x,), str(path), input_names=["x"], output_names=["z"], dynamo=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (got,) = ReferenceEvaluator(model).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), block(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(mode="softmax"), "mode must be one of 'gaussian', 'embedded_gaussian'"),
        (dict(dim=4), "dim must be one of"),
        (dict(pool_position="middle"), "pool_position"),
        (dict(norm="gn"), "norm must be one of"),
        (dict(pool=(2, 2)), "pool must have 3 positive ints"),
        (dict(scale=-1.0), "scale must be"),
        (dict(mode="gaussian", memory_channels=4), "memory_channels must equal in_channels"),
        (dict(dim=2, extent="time"), "needs dim=3"),
        (dict(temporal_groups=0), "temporal_groups must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NonLocalBlock(8, **kwargs)


def test_bad_inputs_name_what_was_expected():
    block = NonLocalBlock(8, dim=3, memory_channels=6)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, C, T, H, W\), got 4-D"):
        block(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="expected x with 8 channels, got 7"):
        block(torch.randn(2, 7, 2, 4, 4))
    with pytest.raises(ValueError, match="memory_channels=6 channels, got 8"):
        block(torch.randn(2, 8, 2, 4, 4), memory=torch.randn(2, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="memory batch 3 does not match x batch 2"):
        block(torch.randn(2, 8, 2, 4, 4), memory=torch.randn(3, 6, 2, 4, 4))
    with pytest.raises(ValueError, match="larger than the key grid"):
        block(torch.randn(2, 8, 2, 1, 1), memory=torch.randn(2, 6, 2, 1, 1))
    with pytest.raises(ValueError, match="divisible into groups"):
        NonLocalBlock(8, temporal_groups=4)(torch.randn(1, 8, 6, 4, 4))


def test_meta_device_for_shape_and_flop_counting():
    block = NonLocalBlock(16, mode="embedded_gaussian").to("meta")
    x = torch.empty(2, 16, 4, 8, 8, device="meta", requires_grad=True)
    out = block(x)
    out.sum().backward()
    assert out.shape == x.shape and block.attention(x).shape == (2, 256, 64)
