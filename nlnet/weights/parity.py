"""Does a converted file compute what its source framework computes? Stage-by-stage differences on one clip.

The source framework's own network (mmaction2's ``ResNet3d`` + ``I3DHead``, or PySlowFast's ``ResNetModel``),
when importable, is built with the source weights and nlnet's network from the converted file; both run on the
same seeded random clip, and forward hooks on corresponding modules record each stage's output, so a fault shows
up at the first stage it touches. Caffe2 has no reference implementation here, and its files store no reference
outputs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nlnet.weights.caffe2 import load_converted
from nlnet.weights.mmaction2 import nonlocal_mode_from, read_mmaction2
from nlnet.weights.pyslowfast import architecture, block_indices, nonlocal_mode_of, read_pyslowfast

# configs/_base_/models/i3d_r50.py of mmaction2 1.x: which bottlenecks are temporal (3x1x1 conv1), and where
# configs/recognition/i3d/*nl*.py put non-local blocks (res3 {1, 3}, res4 {1, 3, 5}).
I3D_INFLATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
I3D_NON_LOCAL = ((0, 0, 0), (0, 1, 0, 1), (0, 1, 0, 1, 0, 1), (0, 0, 0))
# (stage, nlnet module, mmaction2 Recognizer module): the outputs compared. nlnet's stem includes pool1.
STAGES = (
    ("stem", "stem", "backbone.maxpool"),
    ("res2", "res2", "backbone.layer1"),
    ("res3", "res3", "backbone.layer2"),
    ("res4", "res4", "backbone.layer3"),
    ("res5", "res5", "backbone.layer4"),
    ("logits", "head", "cls_head"),
)
CLIP_SHAPE = (1, 3, 16, 64, 64)  # the smallest clip both accept with room: pool1 and pool2 halve time
# The same for PySlowFast's ResNetModel; its head's projection gives channel-last logits per position.
PYSLOWFAST_STAGES = (
    ("stem", "stem", "network.s1"),
    ("res2", "res2", "network.s2"),
    ("res3", "res3", "network.s3"),
    ("res4", "res4", "network.s4"),
    ("res5", "res5", "network.s5"),
    ("logits", "head", "network.head.projection"),
)
PYSLOWFAST_CLIP_SHAPE = (1, 3, 8, 64, 64)  # 8x8 models: pool2 halves time; the head pools 4 x 2 x 2
DEFAULT_TOLERANCE = 1e-4


@dataclass
class StageDifference:
    """The largest |nlnet - reference| of one stage's output, and the largest |reference| (its scale)."""

    stage: str
    max_abs_diff: float
    scale: float

    def over(self, tolerance: float) -> bool:
        return self.max_abs_diff > tolerance * self.scale


@dataclass
class ParityReport:
    """The outcome of a check: per-stage differences, or why no check was possible (``checked`` False)."""

    checked: bool
    tolerance: float = DEFAULT_TOLERANCE
    stages: list[StageDifference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_over(self) -> str | None:
        """The first stage whose difference exceeds ``tolerance`` x its scale: where the fault starts."""
        return next((entry.stage for entry in self.stages if entry.over(self.tolerance)), None)

    @property
    def passed(self) -> bool:
        """True when checked and the logits agree within ``tolerance`` relative to the largest logit."""
        logits = next((entry for entry in self.stages if entry.stage == "logits"), None)
        return self.checked and logits is not None and not logits.over(self.tolerance)

    def summary(self) -> str:
        lines = [f"check: {note}" for note in self.notes]
        for entry in self.stages:
            relative = entry.max_abs_diff / entry.scale if entry.scale else float("inf")
            flag = "  OVER" if entry.over(self.tolerance) else ""
            lines.append(
                f"  {entry.stage:<7} max |diff| {entry.max_abs_diff:.3e}  (max |ref| {entry.scale:.3e}, "
                f"relative {relative:.1e}){flag}"
            )
        if self.checked:
            verdict = "passed" if self.passed else f"FAILED (first stage over tolerance: {self.first_over})"
            lines.append(f"check {verdict}: tolerance {self.tolerance:g} relative to each stage's largest output")
        return "\n".join(lines)


def import_mmaction2() -> types.ModuleType:
    """mmaction2's ``mmaction.models`` package, for ``ResNet3d`` and ``I3DHead``.

    Raises:
        ImportError: mmaction2 (or mmcv / mmengine, which it needs) is not importable; the message says which.
    """
    if importlib.util.find_spec("mmaction") is None:
        raise ImportError("mmaction2 is not installed (the 'mmaction' package is not on the path)")
    # The PyPI wheel of mmaction2 1.2.0 lacks mmaction.models.localizers.drn, which mmaction.models imports;
    # stand in an empty package for it (no I3D code uses it).
    package = types.ModuleType("mmaction.models.localizers.drn")
    package.__path__ = []
    module = types.ModuleType("mmaction.models.localizers.drn.drn")
    module.DRN = type("DRN", (), {})
    sys.modules.setdefault("mmaction.models.localizers.drn", package)
    sys.modules.setdefault("mmaction.models.localizers.drn.drn", module)
    return importlib.import_module("mmaction.models")


class MMAction2Recognizer(nn.Module):
    """mmaction2's Recognizer3D layout (``backbone`` + ``cls_head``, its state-dict prefixes) for eval.

    The defaults are mmaction2's I3D R50 config; ``non_local`` None builds no non-local blocks. Non-local blocks
    use that config's settings: keys and values max-pooled (``sub_sample``), no 1/sqrt(d) scale, BN after the
    output conv.
    """

    def __init__(
        self,
        *,
        num_classes: int = 400,
        stage_blocks: Sequence[int] = (3, 4, 6, 3),
        base_channels: int = 64,
        conv1_kernel: Sequence[int] = (5, 7, 7),
        inflate: Sequence[Sequence[int]] = I3D_INFLATE,
        non_local: Sequence[Sequence[int]] | None = None,
        nonlocal_mode: str = "embedded_gaussian",
        sub_sample: bool = True,
    ) -> None:
        super().__init__()
        models = import_mmaction2()
        options = {}
        if non_local is not None:
            options = {
                "non_local": tuple(tuple(stage) for stage in non_local),
                "non_local_cfg": {
                    "sub_sample": sub_sample,
                    "use_scale": False,
                    "mode": nonlocal_mode,
                    "norm_cfg": {"type": "BN3d", "requires_grad": True},
                },
            }
        self.backbone = models.ResNet3d(
            depth=50,  # with stage_blocks given, depth only picks the block type: bottlenecks for 50 and 101
            stage_blocks=tuple(stage_blocks),
            base_channels=base_channels,
            pretrained=None,
            pretrained2d=False,
            conv1_kernel=tuple(conv1_kernel),
            conv1_stride_t=2,
            pool1_stride_t=2,
            conv_cfg={"type": "Conv3d"},
            norm_eval=False,
            inflate=tuple(tuple(stage) for stage in inflate),
            zero_init_residual=False,
            **options,
        )
        in_channels = base_channels * 2 ** (len(stage_blocks) - 1) * 4
        self.cls_head = models.I3DHead(
            num_classes=num_classes, in_channels=in_channels, spatial_type="avg", dropout_ratio=0.5
        )

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.backbone(clip))


def _recognizer_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's network tensors under Recognizer3D names: DDP's ``module.`` dropped, a bare backbone prefixed."""
    renamed = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        if key.startswith("data_preprocessor."):
            continue  # mean / std buffers, not part of the network
        renamed[key if key.startswith(("backbone.", "cls_head.")) else f"backbone.{key}"] = tensor
    return renamed


def mmaction2_reference(state: Mapping[str, torch.Tensor], nonlocal_mode: str | None) -> MMAction2Recognizer:
    """mmaction2's network shaped as the checkpoint's tensors say, with those tensors loaded, in eval mode.

    Stage depths, widths, the stem kernel, which blocks are temporal and which have non-local blocks are read
    from the tensors; the strides are mmaction2's I3D config's (the file does not record them).

    Raises:
        ValueError: the tensors do not fill the network (e.g. no ``cls_head``), or the non-local mode is unknown.
    """
    state = _recognizer_keys(state)
    stage_blocks, inflate, non_local = [], [], []
    for layer in range(1, 5):
        count = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"backbone.layer{layer}."))
        stage_blocks.append(count)
        inflate.append([int(state[f"backbone.layer{layer}.{i}.conv1.conv.weight"].shape[2] > 1) for i in range(count)])
        non_local.append(
            [
                int(
                    f"backbone.layer{layer}.{i}.non_local_block.g.0.conv.weight" in state
                    or f"backbone.layer{layer}.{i}.non_local_block.g.conv.weight" in state
                )
                for i in range(count)
            ]
        )
    has_nonlocal = any(any(stage) for stage in non_local)
    if has_nonlocal and nonlocal_mode is None:
        raise ValueError("the non-local mode is unknown: pass it (--nonlocal-mode)")
    stem = state["backbone.conv1.conv.weight"]
    fc = state.get("cls_head.fc_cls.weight")
    if fc is None:
        raise ValueError("the checkpoint has no cls_head.fc_cls: no logits to compare")
    reference = MMAction2Recognizer(
        num_classes=fc.shape[0],
        stage_blocks=stage_blocks,
        base_channels=stem.shape[0],
        conv1_kernel=stem.shape[2:],
        inflate=inflate,
        non_local=non_local if has_nonlocal else None,
        nonlocal_mode=nonlocal_mode or "embedded_gaussian",
        sub_sample=any(".non_local_block.g.0." in key for key in state),
    )
    try:
        reference.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"mmaction2's network does not take the checkpoint's tensors: {error}") from error
    return reference.eval()


def stage_outputs(network: nn.Module, modules: Sequence[str], clip: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``modules`` (dotted names) when ``network`` runs on ``clip``, through forward hooks."""
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str, output: torch.Tensor | Sequence[torch.Tensor]) -> None:
        # PySlowFast's stages take and return a list of pathways; these networks have one.
        outputs[name] = (output[0] if isinstance(output, (list, tuple)) else output).detach().clone()

    handles = [
        network.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: record(name, output)
        )
        for name in modules
    ]
    try:
        with torch.no_grad():
            network(clip)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in modules]


def compare(
    model: nn.Module,
    reference: nn.Module,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    stages: Sequence[tuple[str, str, str]] = STAGES,
    clip_shape: Sequence[int] = CLIP_SHAPE,
) -> ParityReport:
    """Run nlnet's ``model`` and the source framework's ``reference`` on one seeded random clip of
    ``clip_shape``; the largest difference of each of ``stages`` ((stage, nlnet module, reference module))."""
    clip = torch.randn(tuple(clip_shape), generator=torch.Generator().manual_seed(seed))
    ours = stage_outputs(model.eval(), [nlnet for _, nlnet, _ in stages], clip)
    theirs = stage_outputs(reference.eval(), [other for _, _, other in stages], clip)
    report = ParityReport(checked=True, tolerance=tolerance)
    for (stage, _, _), mine, expected in zip(stages, ours, theirs, strict=True):
        if stage == "logits" and expected.dim() > 2:
            # Logits per position (N, T, H, W, classes): their mean is the logit of the pooled features.
            expected = expected.flatten(1, -2).mean(1)
        if mine.shape != expected.shape:
            raise ValueError(f"{stage}: nlnet gives {tuple(mine.shape)}, the reference {tuple(expected.shape)}")
        difference = float((mine - expected).abs().max())
        report.stages.append(StageDifference(stage, difference, float(expected.abs().max())))
    return report


def _reference_mode(
    recorded: str | None, has_nonlocal: bool, converted: Mapping[str, Any]
) -> tuple[str | None, list[str]]:
    """The non-local mode the reference network is built with: the one the source records, else (with a note)
    the converted file's. Only the source's own word lets a wrong ``--nonlocal-mode`` show up as a difference."""
    if recorded is not None or not has_nonlocal:
        return recorded, []
    mode = converted.get("overrides", {}).get("nonlocal_mode")
    return mode, [f"the source does not record its non-local mode: the reference uses the converted {mode!r}"]


def _unavailable(importer: Callable[[], Any], tolerance: float) -> ParityReport | None:
    """Why no check is possible when ``importer`` cannot import the source framework, else None."""
    try:
        importer()
    except ImportError as error:
        return ParityReport(checked=False, tolerance=tolerance, notes=[f"no check was possible: {error}"])
    return None


def _clip_note(framework: str, clip_shape: Sequence[int]) -> str:
    return f"{framework} vs nlnet on one random {'x'.join(map(str, clip_shape))} clip"


def check_mmaction2(
    source_path: str | os.PathLike, converted_path: str | os.PathLike, *, tolerance: float = DEFAULT_TOLERANCE
) -> ParityReport:
    """Compare a `convert_mmaction2` output with mmaction2 itself running the source checkpoint.

    Returns:
        The per-stage report; ``checked`` False (with the reason in ``notes``) when mmaction2 is not importable.
    """
    if (report := _unavailable(import_mmaction2, tolerance)) is not None:
        return report
    state, meta, _ = read_mmaction2(source_path)
    converted = torch.load(os.fspath(converted_path), map_location="cpu", weights_only=True)
    has_nonlocal = any(".non_local_block." in key for key in state)
    mode, notes = _reference_mode(nonlocal_mode_from(meta, state), has_nonlocal, converted)
    report = compare(load_converted(converted_path), mmaction2_reference(state, mode), tolerance=tolerance)
    report.notes[:0] = notes + [_clip_note("mmaction2", CLIP_SHAPE)]
    return report


def import_pyslowfast() -> tuple[Any, type[nn.Module]]:
    """PySlowFast's ``get_cfg`` and ``ResNetModel``.

    Its head module imports detectron2's ``ROIAlign`` for the AVA detection head, which no Kinetics model
    builds; when detectron2 is absent, torchvision's ``RoIAlign`` stands in for it.

    Raises:
        ImportError: PySlowFast is not installed; the message says so.
    """
    if importlib.util.find_spec("slowfast") is None:
        raise ImportError("PySlowFast is not installed (the 'slowfast' package is not on the path)")
    if "detectron2" not in sys.modules and importlib.util.find_spec("detectron2") is None:
        from torchvision.ops import RoIAlign

        layers = types.ModuleType("detectron2.layers")
        layers.ROIAlign = RoIAlign
        package = types.ModuleType("detectron2")
        package.__path__, package.layers = [], layers
        sys.modules.setdefault("detectron2", package)
        sys.modules.setdefault("detectron2.layers", layers)
    defaults = importlib.import_module("slowfast.config.defaults")
    return defaults.get_cfg, importlib.import_module("slowfast.models.video_model_builder").ResNetModel


class PySlowFastReference(nn.Module):
    """PySlowFast's ``ResNetModel`` taking one tensor (it takes a list of pathways) for `compare`."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.network([clip])


def pyslowfast_reference(state: Mapping[str, torch.Tensor], nonlocal_mode: str | None) -> PySlowFastReference:
    """PySlowFast's network configured as the model_state's tensors say (arch, depth, width, non-local
    locations, classes), for `PYSLOWFAST_CLIP_SHAPE` clips, with those tensors loaded, in eval mode.

    Raises:
        ValueError: the tensors do not fill that network, or the non-local mode is neither softmax
            (embedded_gaussian) nor dot_product, PySlowFast's two.
    """
    get_cfg, resnet_model = import_pyslowfast()
    arch, depth = architecture(state)
    locations = block_indices(state, "nonlocal")
    instantiation = {"embedded_gaussian": "softmax", "dot_product": "dot_product", None: "softmax"}.get(nonlocal_mode)
    if instantiation is None:
        raise ValueError(f"PySlowFast has no {nonlocal_mode!r} non-local block (softmax or dot_product)")
    cfg = get_cfg()
    cfg.MODEL.ARCH, cfg.RESNET.DEPTH = arch, depth
    cfg.MODEL.NUM_CLASSES = state["head.projection.weight"].shape[0]
    cfg.RESNET.WIDTH_PER_GROUP = state["s1.pathway0_stem.conv.weight"].shape[0]
    cfg.RESNET.NUM_BLOCK_TEMP_KERNEL = [[len(block)] for block in block_indices(state, "res")]
    cfg.NONLOCAL.LOCATION = [[indices] for indices in locations]
    cfg.NONLOCAL.INSTANTIATION = instantiation
    cfg.DATA.INPUT_CHANNEL_NUM = [3]
    cfg.DATA.NUM_FRAMES = PYSLOWFAST_CLIP_SHAPE[2]
    for crop in ("CROP_SIZE", "TRAIN_CROP_SIZE"):  # the head's pooling window: older releases read the first
        if crop in cfg.DATA:
            cfg.DATA[crop] = PYSLOWFAST_CLIP_SHAPE[-1]
    reference = PySlowFastReference(resnet_model(cfg))
    try:
        reference.network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"PySlowFast's network does not take the checkpoint's tensors: {error}") from error
    return reference.eval()


def check_pyslowfast(
    source_path: str | os.PathLike, converted_path: str | os.PathLike, *, tolerance: float = DEFAULT_TOLERANCE
) -> ParityReport:
    """Compare a `convert_pyslowfast` output with PySlowFast itself running the source checkpoint.

    Returns:
        The per-stage report; ``checked`` False (with the reason in ``notes``) when PySlowFast is not importable.
    """
    if (report := _unavailable(import_pyslowfast, tolerance)) is not None:
        return report
    state, cfg, _ = read_pyslowfast(source_path)
    converted = torch.load(os.fspath(converted_path), map_location="cpu", weights_only=True)
    has_nonlocal = block_indices(state, "nonlocal") != [[]] * 4
    mode, notes = _reference_mode(nonlocal_mode_of(cfg), has_nonlocal, converted)
    report = compare(
        load_converted(converted_path),
        pyslowfast_reference(state, mode),
        tolerance=tolerance,
        stages=PYSLOWFAST_STAGES,
        clip_shape=PYSLOWFAST_CLIP_SHAPE,
    )
    report.notes[:0] = notes + [_clip_note("PySlowFast", PYSLOWFAST_CLIP_SHAPE)]
    return report


def check_converted(
    source: str, source_path: str | os.PathLike, converted_path: str | os.PathLike, *, tolerance: float
) -> ParityReport:
    """`check_mmaction2` or `check_pyslowfast` for those sources; for 'caffe2', why no check is possible."""
    if source == "mmaction2":
        return check_mmaction2(source_path, converted_path, tolerance=tolerance)
    if source == "pyslowfast":
        return check_pyslowfast(source_path, converted_path, tolerance=tolerance)
    return ParityReport(
        checked=False,
        tolerance=tolerance,
        notes=[
            "no check was possible: no reference implementation of the Caffe2 (Detectron) video code is available "
            "here, and the file stores no reference outputs to compare against"
        ],
    )
