"""What a non-local block attends to: attention maps in pixel coordinates, and query dependence.

The paper's Figures 1 and 3 show, for one query position in one frame, the positions of the whole clip that
its non-local block weighs most. Here that is three steps:

1. run the model once with a forward pre-hook on the block that records its input (and ``memory`` when one is
   given), stopping the forward there, then call ``block.attention(x)`` in eval mode: the (B, N, M) weights;
2. map positions between the frames the model was given and the block's grids. With ``S`` the frame size and
   ``F`` the feature size along one axis, a feature cell spans ``S / F`` pixels (a float in general, e.g.
   224 pixels over 55 cells); a key cell of a block that max-pools with kernel ``k`` spans ``k · S / F``.
   Pixel ``c`` (pixel centres at integers, as in NumPy indexing and ``imshow``) lies in cell
   ``floor((c + 0.5) / span)``, and cell ``i`` has its centre at ``(i + 0.5) · span - 0.5``. Pooling floors
   the grid, so the last ``F mod k`` feature cells belong to no key;
3. draw the frames with the query marked and the attended positions (``nlnet.viz.drawing``).

Detectors (torchvision R-CNNs) resize and pad the image before the backbone; coordinates are then mapped back
to the image given, through the resize factor the detector's transform used.

GCNet (Cao et al., 2019) asked whether these maps depend on the query at all; :func:`query_dependence` gives
its measure, the mean cosine distance between the attention maps of different queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nlnet.layers import NonLocalBlock

__all__ = [
    "AttentionMap",
    "attention_map",
    "auto_query",
    "block_attention",
    "is_detector",
    "query_dependence",
]

AUTO_STRATEGIES = ("motion", "attended")


class _StopForward(Exception):
    """Raised by the capturing hook once every wanted block is seen, so the rest of the model is skipped."""


@dataclass(frozen=True)
class _Geometry:
    """Where the block's grids lie on the frames the caller gave.

    Attributes:
        frame_size: (T, H, W) of the given frames (T = 1 for an image).
        net_size: (T, H, W) of the tensor the network computed its features from (a detector's padded batch).
        resize: per axis, net pixels per frame pixel (1 for video models; a detector's resize factor).
    """

    frame_size: tuple[int, int, int]
    net_size: tuple[int, int, int]
    resize: tuple[float, float, float]

    def span(self, grid_size: Sequence[int], cells_per_unit: Sequence[int] = (1, 1, 1)) -> tuple[float, ...]:
        """Frame pixels per unit of a grid of ``grid_size`` cells, ``cells_per_unit`` cells to a unit."""
        return tuple(
            k * net / size / r
            for k, net, size, r in zip(cells_per_unit, self.net_size, grid_size, self.resize, strict=True)
        )


@dataclass(frozen=True)
class AttentionMap:
    """The attention of one query position of one non-local block, placed on the frames.

    Coordinates are (t, y, x) in the frames given to :func:`attention_map` — frame index and pixel row and
    column, pixel centres at integers. For an image, t is 0 and the key grid has T' = 1.

    Attributes:
        block: qualified name of the block in the model.
        weights: (T', H', W') attention weights over the key grid (after the block's pooling); they sum to 1
            for the softmax modes.
        key_centers: (T', H', W', 3) centre of each key cell, (t, y, x).
        key_span: frames, rows and columns covered by one key cell (floats).
        query: the query as asked, (t, y, x).
        query_cell: the query's position on the block's input grid, (t, y, x) cell indices.
        query_center: centre of that cell, (t, y, x).
        query_span: frames, rows and columns covered by one query cell.
        frame_size: (T, H, W) of the frames.
    """

    block: str
    weights: np.ndarray
    key_centers: np.ndarray
    key_span: tuple[float, float, float]
    query: tuple[float, float, float]
    query_cell: tuple[int, int, int]
    query_center: tuple[float, float, float]
    query_span: tuple[float, float, float]
    frame_size: tuple[int, int, int]

    def top_keys(self, k: int) -> list[tuple[float, tuple[float, float, float]]]:
        """The ``k`` most attended keys, strongest first, as ``(weight, (t, y, x) centre)``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        flat = self.weights.ravel()
        order = np.argsort(-flat, kind="stable")[: min(k, flat.size)]
        centers = self.key_centers.reshape(-1, 3)
        return [(float(flat[i]), tuple(float(c) for c in centers[i])) for i in order]

    def key_slice(self, frame: float) -> int | None:
        """Index t' of the key slice that covers frame ``frame`` (or a key centre), None when pooling left it out."""
        index = math.floor((frame + 0.5) / self.key_span[0])
        return index if index < self.weights.shape[0] else None

    def upsampled(self) -> np.ndarray:
        """The weights at frame resolution: (T, H, W), each pixel holding the weight of its key cell.

        Pixels of the feature cells that pooling dropped (the last ``F mod k`` along an axis) belong to no key
        and hold 0.
        """
        index = []
        for size, span, keys in zip(self.frame_size, self.key_span, self.weights.shape, strict=True):
            cells = np.floor((np.arange(size) + 0.5) / span).astype(np.int64)
            index.append(np.where(cells < keys, cells, keys))  # ``keys`` points at the zero padding below
        padded = np.pad(self.weights, [(0, 1)] * 3)
        return padded[np.ix_(*index)]


def _capture(
    model: nn.Module, inputs: torch.Tensor, names: Sequence[str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], _Geometry]:
    """Runs ``model`` on ``inputs`` until every block in ``names`` has received its input.

    Returns:
        ``{name: (x, memory)}`` and the geometry of the frames relative to the network's input.
    """
    blocks = _blocks(model)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    detector = is_detector(model)
    net_input: dict[str, object] = {}

    def make_hook(name: str):
        def hook(module, args, kwargs):
            memory = args[1] if len(args) > 1 else kwargs.get("memory")
            captured[name] = (args[0].detach(), None if memory is None else memory.detach())
            if len(captured) == len(names):
                raise _StopForward

        return hook

    handles = [blocks[name].register_forward_pre_hook(make_hook(name), with_kwargs=True) for name in names]
    if detector:
        def transform_hook(module, args, output):
            net_input["images"] = output[0]

        handles.append(model.transform.register_forward_hook(transform_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model([inputs]) if detector else model(inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in names if name not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never reached the non-local block(s) {missing}")

    if detector:
        images = net_input["images"]
        height, width = inputs.shape[-2:]
        resized_h, resized_w = images.image_sizes[0]
        geometry = _Geometry(
            frame_size=(1, height, width),
            net_size=(1, *images.tensors.shape[-2:]),
            resize=(1.0, resized_h / height, resized_w / width),
        )
    else:
        size = _frame_size(inputs)
        geometry = _Geometry(frame_size=size, net_size=size, resize=(1.0, 1.0, 1.0))
    return captured, geometry


def _frame_size(inputs: torch.Tensor) -> tuple[int, int, int]:
    if inputs.dim() == 5:
        return tuple(int(s) for s in inputs.shape[2:])
    if inputs.dim() == 4:
        return (1, int(inputs.shape[2]), int(inputs.shape[3]))
    raise ValueError(f"expected a clip (1, C, T, H, W) or an image (1, C, H, W), got {tuple(inputs.shape)}")


def _grid_size(features: torch.Tensor) -> tuple[int, int, int]:
    """(T, H, W) of a block input; 2D inputs get T = 1."""
    if features.dim() == 5:
        return tuple(int(s) for s in features.shape[2:])
    if features.dim() == 4:
        return (1, int(features.shape[2]), int(features.shape[3]))
    raise ValueError(
        f"attention maps need a 2D or 3D non-local block; got a block input of shape {tuple(features.shape)}"
    )


def _key_kernel(block: NonLocalBlock) -> tuple[int, int, int]:
    if block.pool_kernel is None:
        return (1, 1, 1)
    kernel = tuple(block.pool_kernel)
    return kernel if len(kernel) == 3 else (1, *kernel)


def is_detector(model: nn.Module) -> bool:
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, GeneralizedRCNN)


def _blocks(model: nn.Module) -> dict[str, NonLocalBlock]:
    from nlnet.models import nonlocal_blocks

    return nonlocal_blocks(model)


def _prepare(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Moves ``inputs`` to the model's device and adds the batch axis it expects (not for detectors, which take
    a list of (3, H, W) images)."""
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        inputs = inputs.to(parameter.device)
    if is_detector(model):
        if inputs.dim() != 3 or inputs.shape[0] != 3:
            raise ValueError(f"a detector takes one (3, H, W) image in [0, 1], got {tuple(inputs.shape)}")
        return inputs
    # The blocks' dimensionality says whether a 4-D input is one unbatched clip or one batched image.
    sample_dims = 4 if all(b.dim == 3 for b in _blocks(model).values()) else 3
    if inputs.dim() == sample_dims:
        inputs = inputs[None]
    if inputs.dim() != sample_dims + 1 or inputs.shape[0] != 1:
        layout = "(C, T, H, W)" if sample_dims == 4 else "(C, H, W)"
        raise ValueError(f"expected a sample {layout}, batched or not, got {tuple(inputs.shape)}")
    return inputs


def _resolve_names(model: nn.Module, block: str | Sequence[str] | None, detector: bool) -> list[str]:
    blocks = _blocks(model)
    if detector:
        # Head blocks see RoI features, not the image: their positions have no place on the frame.
        blocks = {name: b for name, b in blocks.items() if name.startswith("backbone.")}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no non-local block whose positions map onto its input")
    if block is None:
        return list(blocks)
    wanted = [block] if isinstance(block, str) else list(block)
    unknown = [name for name in wanted if name not in blocks]
    if unknown:
        raise ValueError(f"no non-local block named {unknown}; the model has: {', '.join(blocks)}")
    return wanted


def block_attention(
    model: nn.Module, inputs: torch.Tensor, block: str | Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The full attention matrix of one or more non-local blocks for one clip or image.

    Args:
        model: a video model, any module with ``NonLocalBlock`` children, or a torchvision R-CNN detector.
        inputs: the model's input for one sample: (C, T, H, W) or (1, C, T, H, W) for video models, (C, H, W)
            or (1, C, H, W) for 2D models, a (3, H, W) image in [0, 1] for detectors.
        block: block name(s); None for all (the detector's backbone blocks).

    Returns:
        ``{name: (N, M) float32 weights}`` in forward order, rows the block's input positions and columns its
        key positions, both flattened in row-major (T, H, W) order.
    """
    inputs = _prepare(model, inputs)
    names = _resolve_names(model, block, is_detector(model))
    captured, _ = _capture(model, inputs, names)
    return _attention_rows(model, captured)


def _attention_rows(model: nn.Module, captured: dict) -> dict[str, torch.Tensor]:
    blocks = _blocks(model)
    result = {}
    for name, (x, memory) in captured.items():
        block = blocks[name]
        was_training = block.training
        block.eval()
        try:
            with torch.no_grad():
                result[name] = block.attention(x, memory)[0].float().cpu()  # (N, M)
        finally:
            block.train(was_training)
    return result


def attention_map(
    model: nn.Module,
    inputs: torch.Tensor,
    query: Sequence[float] | None = None,
    block: str | None = None,
    *,
    auto: str = "motion",
) -> AttentionMap:
    """Where one query position of a non-local block looks, on the frames the model was given.

    Args:
        model: a video model, any module with ``NonLocalBlock`` children, or a torchvision R-CNN detector.
        inputs: one sample as the model takes it (see :func:`block_attention`); for video models the
            normalised clip (C, T, H, W).
        query: (t, y, x) frame index and pixel of the query; for an image (y, x) or (0, y, x). None picks one
            with :func:`auto_query` and the strategy ``auto``.
        block: the block's qualified name; None takes the last block of the model (the deepest).
        auto: ``"motion"`` or ``"attended"``, used when ``query`` is None.

    Returns:
        An :class:`AttentionMap` whose weights are the query's row of ``block.attention``.

    Raises:
        ValueError: an unknown block, a query outside the frames, or an input of the wrong shape.
    """
    inputs = _prepare(model, inputs)
    detector = is_detector(model)
    names = _resolve_names(model, block, detector)
    name = names[-1] if block is None else block
    captured, geometry = _capture(model, inputs, [name])
    rows = _attention_rows(model, captured)[name]
    x, memory = captured[name]
    blocks = _blocks(model)
    query_grid = _grid_size(x)
    source_grid = _grid_size(x if memory is None else memory)
    kernel = _key_kernel(blocks[name])
    key_grid = tuple(size // k for size, k in zip(source_grid, kernel, strict=True))
    if math.prod(key_grid) != rows.shape[1]:
        raise RuntimeError(f"block {name}: {math.prod(key_grid)} keys expected, got {rows.shape[1]}")

    query_span = geometry.span(query_grid)
    key_span = geometry.span(source_grid, kernel)
    if query is None:
        clip = None if detector else inputs
        query = _auto_query(clip, rows, geometry, query_grid, key_grid, key_span, auto)
    query = _check_query(query, geometry.frame_size)
    cell = tuple(
        min(math.floor((c + 0.5) / span), size - 1)
        for c, span, size in zip(query, query_span, query_grid, strict=True)
    )
    row = rows[(cell[0] * query_grid[1] + cell[1]) * query_grid[2] + cell[2]]
    return AttentionMap(
        block=name,
        weights=row.reshape(key_grid).cpu().numpy(),
        key_centers=_centers(key_grid, key_span),
        key_span=key_span,
        query=query,
        query_cell=cell,
        query_center=tuple((i + 0.5) * span - 0.5 for i, span in zip(cell, query_span, strict=True)),
        query_span=query_span,
        frame_size=geometry.frame_size,
    )


def _centers(grid: Sequence[int], span: Sequence[float]) -> np.ndarray:
    """(T', H', W', 3) centres of the cells of ``grid``, each ``span`` frame pixels wide."""
    axes = [(np.arange(size) + 0.5) * s - 0.5 for size, s in zip(grid, span, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _check_query(query: Sequence[float], frame_size: tuple[int, int, int]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in query)
    if len(values) == 2 and frame_size[0] == 1:
        values = (0.0, *values)
    if len(values) != 3:
        raise ValueError(f"query must be (t, y, x) (or (y, x) for an image), got {tuple(query)}")
    for axis, value, size in zip("tyx", values, frame_size, strict=True):
        if not 0 <= value < size:
            raise ValueError(f"query {axis}={value:g} is outside the frames; {axis} must be in [0, {size}) "
                             f"for frames of size (T, H, W) = {frame_size}")
    return values


def _auto_query(
    inputs: torch.Tensor | None,
    rows: torch.Tensor,
    geometry: _Geometry,
    query_grid: tuple[int, int, int],
    key_grid: tuple[int, int, int],
    key_span: tuple[float, ...],
    strategy: str,
) -> tuple[float, float, float]:
    if strategy not in AUTO_STRATEGIES:
        raise ValueError(f"auto must be one of {AUTO_STRATEGIES}, got {strategy!r}")
    if strategy == "motion" and inputs is not None and inputs.dim() == 5 and inputs.shape[2] > 1:
        # Mean absolute frame difference, averaged per query cell; a still clip falls through to "attended".
        change = (inputs[0, :, 1:] - inputs[0, :, :-1]).abs().mean(0)  # (T-1, H, W)
        change = torch.cat([change[:1], change], 0)  # frame t's change is the one that led to it
        if float(change.max()) > 0:
            pooled = nn.functional.adaptive_avg_pool3d(change[None, None].float(), query_grid)[0, 0]
            cell = np.unravel_index(int(pooled.argmax()), query_grid)
            span = geometry.span(query_grid)
            return _clip_to_frames(cell, span, geometry.frame_size)
    # The key that receives the most attention summed over all queries, used as the query itself.
    cell = np.unravel_index(int(rows.sum(0).argmax()), key_grid)
    return _clip_to_frames(cell, key_span, geometry.frame_size)


def _clip_to_frames(cell, span, frame_size) -> tuple[float, float, float]:
    return tuple(
        float(min(max(round((i + 0.5) * s - 0.5), 0), size - 1))
        for i, s, size in zip(cell, span, frame_size, strict=True)
    )


def auto_query(model: nn.Module, inputs: torch.Tensor, block: str | None = None, strategy: str = "motion"):
    """A query worth looking at, as (t, y, x).

    Args:
        model: as in :func:`attention_map`.
        inputs: as in :func:`attention_map`.
        block: the block's name; None for the model's last block.
        strategy: ``"motion"``: the centre of the block's input cell whose pixels change most between
            consecutive frames (falls back to ``"attended"`` for images and still clips); ``"attended"``: the
            centre of the key cell that receives the most attention summed over all queries.
    """
    return attention_map(model, inputs, None, block, auto=strategy).query


def query_dependence(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    block: str | Sequence[str] | None = None,
    *,
    num_queries: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """GCNet's measure of how much the attention maps depend on the query: mean cosine distance, per block.

    For each block, ``num_queries`` query positions are drawn at random (all of them when there are fewer);
    the distance between two of their attention rows a and b is ``1 - a·b / (|a| |b|)``; the result is the
    mean over all pairs of different queries, averaged over the inputs. 0 means every query sees the same
    map (the block could be replaced by one global context vector, GCNet's simplification).

    Args:
        model: as in :func:`block_attention`.
        inputs: one sample or a sequence of samples, each as in :func:`block_attention`.
        block: block name(s); None for all.
        num_queries: queries sampled per block and input (>= 2).
        seed: seed of the query sampling.

    Returns:
        ``{block name: mean cosine distance}`` in forward order.
    """
    if num_queries < 2:
        raise ValueError(f"num_queries must be >= 2 to compare queries, got {num_queries}")
    samples = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not samples:
        raise ValueError("query_dependence needs at least one input")
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    for sample in samples:
        for name, rows in block_attention(model, sample, block).items():
            chosen = torch.randperm(rows.shape[0], generator=generator)[:num_queries]
            unit = nn.functional.normalize(rows[chosen].double(), dim=1)
            cosine = unit @ unit.T  # (Q, Q)
            count = cosine.shape[0]
            mean_distance = (count * count - cosine.sum()) / (count * (count - 1))  # diagonal distances are 0
            totals[name] = totals.get(name, 0.0) + float(mean_distance) / len(samples)
    return totals
