"""What a non-local block attends to: attention maps in pixel coordinates, figures, and query dependence.

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
3. draw the frames with the query marked and the attended positions as a heat map or as the paper's arrows.

Detectors (torchvision R-CNNs) resize and pad the image before the backbone; coordinates are then mapped back
to the image given, through the resize factor the detector's transform used.

GCNet (Cao et al., 2019) asked whether these maps depend on the query at all; :func:`query_dependence` gives
its measure, the mean cosine distance between the attention maps of different queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from nlnet.layers import NonLocalBlock

__all__ = [
    "AttentionMap",
    "BuiltinAttentionReport",
    "attention_map",
    "auto_query",
    "block_attention",
    "builtin_attention_figure",
    "load_input",
    "load_model",
    "measure_query_dependence",
    "plot_attention",
    "query_dependence",
    "render_gif_frames",
    "save_attention",
    "save_attention_figure",
]

STYLES = ("heatmap", "arrows")
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
    detector = _is_detector(model)
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


def _is_detector(model: nn.Module) -> bool:
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
    if _is_detector(model):
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
    names = _resolve_names(model, block, _is_detector(model))
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
    detector = _is_detector(model)
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


# -- drawing ---------------------------------------------------------------------------------------------


def _panel_frames(amap: AttentionMap, max_panels: int) -> list[tuple[int, int]]:
    """(key slice t', frame shown) per panel: one panel per key slice, the query's own frame in its slice."""
    slices = amap.weights.shape[0]
    chosen = list(range(slices))
    query_slice = amap.key_slice(int(amap.query[0]))
    if slices > max_panels:
        chosen = sorted(set(np.linspace(0, slices - 1, max_panels).round().astype(int).tolist()))
        if query_slice is not None and query_slice not in chosen:
            chosen[int(np.argmin([abs(s - query_slice) for s in chosen]))] = query_slice
            chosen.sort()
    last = amap.frame_size[0] - 1
    panels = []
    for index in chosen:
        if index == query_slice:
            frame = int(amap.query[0])
        else:
            frame = min(max(round(float(amap.key_centers[index, 0, 0, 0])), 0), last)
        panels.append((index, frame))
    return panels


def plot_attention(
    amap: AttentionMap,
    frames: np.ndarray,
    *,
    style: str = "heatmap",
    top_k: int = 5,
    max_panels: int = 8,
    panel_width: int = 240,
    dpi: int = 100,
):
    """Draws the frames, one panel per key slice, with the query and what it attends to.

    Args:
        amap: from :func:`attention_map`.
        frames: (T, H, W, 3) uint8 RGB frames of the size ``amap.frame_size`` (e.g. from ``denormalize``).
        style: ``"heatmap"``: the weights over each frame, the ``top_k`` keys circled and numbered;
            ``"arrows"``: the paper's drawing, an arrow from the query to each of the ``top_k`` keys, thicker
            for more weight.
        top_k: keys marked (0 for none in the heat map).
        max_panels: at most this many key slices are drawn (evenly spaced, the query's slice always among
            them); arrows to keys in slices left out are not drawn.
        panel_width: width of one panel in pixels; its height follows the frames' aspect ratio.
        dpi: resolution; the figure is ``panels · panel_width`` pixels wide.

    Returns:
        A matplotlib Figure (not shown; save it with ``savefig`` or use :func:`save_attention`).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, ConnectionPatch

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    frames = _check_frames(frames, amap.frame_size)
    panels = _panel_frames(amap, max_panels)
    height, width = amap.frame_size[1:]
    panel_height = round(panel_width * height / width)
    title_height = 40
    fig = Figure(figsize=(len(panels) * panel_width / dpi, (panel_height + title_height) / dpi), dpi=dpi)
    fig.text(0.5, 1 - 20 / (panel_height + title_height), _title(amap), ha="center", va="center", fontsize=7)
    heat = amap.upsampled()
    low, high = _colour_range(amap)
    axes = {}
    for column, (key_slice, frame) in enumerate(panels):
        box = (column / len(panels), 0, 1 / len(panels), panel_height / (panel_height + title_height))
        ax = fig.add_axes(box)
        ax.imshow(frames[frame])
        ax.set_autoscale_on(False)  # markers and arrows must not widen the view beyond the frame
        if style == "heatmap":
            ax.imshow(heat[frame], cmap="jet", alpha=0.45, vmin=low, vmax=high)
        ax.set_axis_off()
        ax.text(4, 4, f"t={frame}", color="white", fontsize=7, va="top",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
        axes[key_slice] = ax
    query_slice = amap.key_slice(int(amap.query[0]))
    query_ax = axes.get(query_slice, next(iter(axes.values())))
    qt, qy, qx = amap.query
    radius = max(2.0, 0.04 * min(height, width))
    for rank, (weight, (t, y, x)) in enumerate(amap.top_keys(top_k) if top_k else [], start=1):
        ax = axes.get(amap.key_slice(t))
        if ax is None:
            continue
        if style == "arrows":
            arrow = ConnectionPatch(
                xyA=(qx, qy), coordsA=query_ax.transData, xyB=(x, y), coordsB=ax.transData,
                arrowstyle="-|>", color="yellow", linewidth=0.8 + 2.5 * weight / high, mutation_scale=8,
            )
            fig.add_artist(arrow)
        else:
            ax.add_patch(Circle((x, y), radius, fill=False, color="white", linewidth=1))
            ax.text(x + radius, y - radius, str(rank), color="white", fontsize=6)
    query_ax.plot([qx], [qy], marker="P", color="white", markeredgecolor="black", markersize=11)
    return fig


def _colour_range(amap: AttentionMap) -> tuple[float, float]:
    """Colour scale of the heat maps: the map's own range, so that near-uniform maps still show structure."""
    low, high = float(amap.weights.min()), float(amap.weights.max())
    return low, max(high, low + 1e-12)


def _title(amap: AttentionMap) -> str:
    t, y, x = (round(v) for v in amap.query)
    low, high = _colour_range(amap)
    return (
        f"{amap.block}, query (t, y, x) = ({t}, {y}, {x})\n"
        f"weights {low:.3g} (blue) to {high:.3g} (red); 1/M = {1 / amap.weights.size:.3g}"
    )


def _check_frames(frames: np.ndarray, frame_size: tuple[int, int, int]) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.shape[:3] != tuple(frame_size) or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3), (T, H, W) = {frame_size}; got {frames.dtype} {frames.shape}"
        )
    return frames


def render_gif_frames(
    amap: AttentionMap, frames: np.ndarray, *, top_k: int = 5, scale: int = 1
) -> list[np.ndarray]:
    """One picture per frame of the clip: the weights of the key slice covering it, the query and top keys.

    Args:
        amap: from :func:`attention_map`.
        frames: (T, H, W, 3) uint8 RGB frames.
        top_k: keys circled on the frames of their slice.
        scale: integer enlargement of the frames (nearest neighbour), for small crops.

    Returns:
        T arrays of shape (H · scale, W · scale, 3), uint8.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    frames = _check_frames(frames, amap.frame_size)
    heat = amap.upsampled()
    low, high = _colour_range(amap)
    colored = colormaps["jet"](np.clip((heat - low) / (high - low), 0, 1))[..., :3] * 255  # (T, H, W, 3)
    blended = (0.55 * frames + 0.45 * colored).round().clip(0, 255).astype(np.uint8)
    keys = amap.top_keys(top_k) if top_k else []
    query_slice = amap.key_slice(int(amap.query[0]))
    qy, qx = (v * scale + scale / 2 for v in amap.query[1:])
    radius = max(3.0, 0.04 * min(amap.frame_size[1:]) * scale)
    pictures = []
    for index in range(len(frames)):
        image = Image.fromarray(blended[index]).resize(
            (blended.shape[2] * scale, blended.shape[1] * scale), Image.Resampling.NEAREST
        )
        draw = ImageDraw.Draw(image)
        frame_slice = amap.key_slice(index)
        for _, (t, y, x) in keys:
            if frame_slice is not None and amap.key_slice(t) == frame_slice:
                cy, cx = y * scale + scale / 2, x * scale + scale / 2
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=(255, 255, 255))
        colour = (255, 0, 0) if frame_slice == query_slice else (160, 160, 160)
        draw.line((qx - radius, qy, qx + radius, qy), fill=colour, width=2)
        draw.line((qx, qy - radius, qx, qy + radius), fill=colour, width=2)
        # A time bar along the bottom edge shows where in the clip the frame is.
        bar = round(image.width * (index + 1) / len(frames))
        draw.rectangle((0, image.height - 3, bar - 1, image.height - 1), fill=(255, 255, 255))
        pictures.append(np.asarray(image))
    return pictures


def save_attention(
    amap: AttentionMap,
    frames: np.ndarray,
    out: str | Path,
    *,
    style: str = "heatmap",
    top_k: int = 5,
    fps: float = 4.0,
    gif_scale: int = 1,
    **plot_options,
) -> Path:
    """Writes a ``.png`` figure (:func:`plot_attention`) or an animated ``.gif`` (:func:`render_gif_frames`).

    Args:
        amap: from :func:`attention_map`.
        frames: (T, H, W, 3) uint8 RGB frames.
        out: destination, ``.png`` or ``.gif``; its directory is created.
        style: figure style for PNGs (see :func:`plot_attention`).
        top_k: keys marked.
        fps: GIF frame rate.
        gif_scale: GIF enlargement factor.
        **plot_options: further keyword arguments of :func:`plot_attention`.

    Returns:
        The path written.
    """
    from PIL import Image

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".gif"):
        raise ValueError(f"output must end in .png or .gif, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        plot_attention(amap, frames, style=style, top_k=top_k, **plot_options).savefig(out)
        return out
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    images = [Image.fromarray(p) for p in render_gif_frames(amap, frames, top_k=top_k, scale=gif_scale)]
    images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return out


# -- from files: checkpoints, videos, images ------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_model(
    checkpoint: str | Path | None = None,
    *,
    config: str | Path | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
) -> tuple[nn.Module, DictConfig]:
    """A trained (or untrained) model and the recipe that says how to feed it, in eval mode on the CPU.

    The recipe is the ``config`` YAML if given, else the recipe stored in the checkpoint, else the defaults;
    then ``overrides`` and ``model_name`` (as ``model.name``) are applied to it. Video models use
    ``nlnet.engine.config``; a detection checkpoint (or a detector's ``model_name``) uses
    ``nlnet.engine.detection``'s recipe.

    Args:
        checkpoint: an nlnet training or detection checkpoint, or a converted official model; a training
            output folder for its latest checkpoint; None for an untrained model (then ``config`` or
            ``model_name`` names it).
        config: YAML recipe (path or shipped name); needed for a checkpoint without one (a converted official
            model). Default: the recipe of the checkpoint (``nlnet.engine.config.recipe_of_checkpoint``).
        model_name: overrides ``model.name``.
        overrides: dotted ``key=value`` strings, e.g. ``["data.num_frames=8"]``.

    Returns:
        ``(model, recipe)``; every tensor of the model comes from the checkpoint when one is given.

    Raises:
        ValueError: the checkpoint does not fit the model, or nothing says which model to build.
    """
    from nlnet.engine import latest_checkpoint, load_checkpoint
    from nlnet.engine.config import recipe_of_checkpoint
    from nlnet.models import detection as detection_models

    named = model_name is not None or any(item.startswith("model.name=") for item in overrides)
    if checkpoint is None and config is None and not named:
        raise ValueError("give a checkpoint, a config or a model name: nothing says which model to show")
    if checkpoint is not None and Path(checkpoint).is_dir():
        folder, checkpoint = checkpoint, latest_checkpoint(checkpoint)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint_<iteration>.pt in {folder}")
    state = load_checkpoint(checkpoint) if checkpoint is not None else {}
    stored = None
    if checkpoint is not None and config is None:
        try:
            stored = recipe_of_checkpoint(checkpoint)
        except FileNotFoundError:
            stored = None  # a converted official model: the defaults and the model name say what it is
    detector = state.get("format") == _DETECTION_FORMAT or (
        model_name is not None and model_name in detection_models.available()
    )
    from nlnet.engine.config import apply_overrides

    names = list(overrides) + ([f"model.name={model_name}"] if model_name is not None else [])
    if detector:
        from nlnet.engine.detection import load_config
    else:
        from nlnet.engine.config import load_config
    recipe = load_config(config if stored is None else stored, [])
    apply_overrides(recipe, names)
    if not detector and recipe.data.format == "builtin":
        from nlnet.engine.builtin import resolve_builtin

        recipe = resolve_builtin(recipe)  # the generated set's folder and lists, as training and testing see them
    weights = state.get("model", state) if state else None
    with torch.random.fork_rng():
        # An untrained model is drawn from the recipe's seed, so its figures can be made again.
        torch.manual_seed(int(recipe.seed))
        model = _build_detector(recipe, weights) if detector else _build_video_model(recipe)
    if weights is not None:
        _load_exactly(model, weights, checkpoint)
    model.eval()
    return model, recipe


_DETECTION_FORMAT = "nlnet-detection-1"


def _build_video_model(recipe: DictConfig) -> nn.Module:
    from omegaconf import OmegaConf

    from nlnet.models import create

    overrides = OmegaConf.to_container(recipe.model.overrides, resolve=True)
    return create(
        recipe.model.name, num_classes=int(recipe.model.num_classes), dropout=float(recipe.model.dropout), **overrides
    )


def _build_detector(recipe: DictConfig, weights: dict | None) -> nn.Module:
    from omegaconf import OmegaConf

    from nlnet.models import detection as detection_models

    kwargs = dict(OmegaConf.to_container(recipe.model.overrides, resolve=True))
    num_classes = None
    if weights is not None:
        # The class and keypoint counts come from the trained predictor's shapes: no dataset is needed.
        classes = weights.get("roi_heads.box_predictor.cls_score.weight")
        num_classes = None if classes is None else int(classes.shape[0])
        keypoints = weights.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
        if keypoints is not None:
            kwargs.setdefault("num_keypoints", int(keypoints.shape[1]))
    return detection_models.create(
        recipe.model.name,
        num_classes=num_classes,
        nonlocal_backbone=bool(recipe.model.nonlocal_backbone),
        nonlocal_head=recipe.model.nonlocal_head,
        nonlocal_mode=recipe.model.nonlocal_mode,
        frozen_bn=bool(recipe.model.frozen_bn),
        trainable_backbone_layers=recipe.model.trainable_backbone_layers,
        **kwargs,
    )


def _load_exactly(model: nn.Module, weights: dict, source: str | Path) -> None:
    """Loads every tensor of ``model`` from ``weights``: a figure of a half-loaded model would mislead."""
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (or a checkpoint with a 'model' entry)")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in weights)
    mismatched = sorted(k for k in own if k in weights and weights[k].shape != own[k].shape)
    if missing or mismatched:
        raise ValueError(
            f"{source} does not fit the model: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:3]}); check the recipe (config, model name)"
        )
    model.load_state_dict({k: weights[k] for k in own})


def load_input(
    path: str | Path,
    model: nn.Module,
    recipe: DictConfig,
    *,
    clip_index: int = 0,
    num_clips: int = 1,
) -> tuple[torch.Tensor, np.ndarray]:
    """Reads what the model takes, as at test time, and the frames it shows.

    Videos: clip ``clip_index`` of ``num_clips`` spread over the video (the test protocol's temporal
    sampling: ``data.num_frames`` frames ``data.sampling_rate`` apart), shorter side to ``data.test_scale``,
    centre crop ``data.test_crop``, normalised with ``data.mean`` / ``data.std``. Images (for detectors): RGB
    scaled to [0, 1]; the detector resizes and normalises them itself.

    Returns:
        ``(inputs, frames)``: the model input — (3, T, S, S) for video models, (3, H, W) for detectors — and
        the uint8 (T, H, W, 3) frames it depicts (T = 1 for an image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if _is_detector(model):
        from PIL import Image

        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"a detector takes an image ({', '.join(IMAGE_SUFFIXES)}), got {path}")
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, pixels[None]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{path} is an image; video models take videos (give a detection checkpoint for images)")

    from nlnet.data.transforms import EvalViews
    from nlnet.data.video import decode_frames, eval_clip_indices

    data = recipe.data
    num_frames, rate = int(data.num_frames), int(data.sampling_rate)
    frames, _ = decode_frames(path, lambda n: eval_clip_indices(n, num_frames, rate, clip_index, num_clips))
    mean, std = _per_channel(data.mean), _per_channel(data.std)
    clip = EvalViews(int(data.test_scale), int(data.test_crop), 1, mean=mean, std=std)(torch.from_numpy(frames))[0]
    # The frames drawn are the network's input itself, un-normalised: what it saw, crop and all.
    shown = clip.permute(1, 2, 3, 0) * torch.tensor(std) + torch.tensor(mean)
    return clip, shown.round().clamp(0, 255).to(torch.uint8).numpy()


def _per_channel(value) -> list[float]:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return values * 3 if len(values) == 1 else values


def save_attention_figure(
    checkpoint: str | Path | None,
    source: str | Path | None,
    out: str | Path,
    *,
    config: str | Path | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
    query: Sequence[float] | None = None,
    auto: str = "motion",
    block: str | None = None,
    style: str = "heatmap",
    top_k: int = 5,
    clip_index: int = 0,
    num_clips: int = 1,
    **save_options,
) -> AttentionMap:
    """``nlnet visualize``: a checkpoint and a video (or an image for a detector) to a PNG or GIF.

    Args:
        checkpoint: see :func:`load_model` (None: an untrained model named by ``config`` / ``model_name``).
        source: a video file, or an image for a detector; None takes the first video of the recipe's test
            split (``data.test_list``), e.g. of the built-in set a checkpoint was trained on.
        out: ``.png`` or ``.gif`` to write.
        config, model_name, overrides: see :func:`load_model`.
        query: (t, y, x) on the displayed frames (the test crop); None picks one (``auto``).
        auto: ``"motion"`` or ``"attended"`` (see :func:`auto_query`).
        block: block name; None for the model's last block.
        style: ``"heatmap"`` or ``"arrows"`` (PNG only).
        top_k: keys marked.
        clip_index, num_clips: which test clip of the video (see :func:`load_input`).
        **save_options: further keyword arguments of :func:`save_attention`.

    Returns:
        The :class:`AttentionMap` drawn.
    """
    model, recipe = load_model(checkpoint, config=config, model_name=model_name, overrides=overrides)
    source = _source_or_first_test_video(source, model, recipe)
    inputs, frames = load_input(source, model, recipe, clip_index=clip_index, num_clips=num_clips)
    amap = attention_map(model, inputs, query, block, auto=auto)
    save_attention(amap, frames, out, style=style, top_k=top_k, **save_options)
    return amap


def measure_query_dependence(
    checkpoint: str | Path | None,
    source: str | Path | None,
    *,
    config: str | Path | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
    block: str | None = None,
    num_clips: int = 1,
    num_queries: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`query_dependence` of every (or one) block over ``num_clips`` test clips of a video (or an image).

    Arguments are those of :func:`save_attention_figure` and :func:`query_dependence`.
    """
    model, recipe = load_model(checkpoint, config=config, model_name=model_name, overrides=overrides)
    source = _source_or_first_test_video(source, model, recipe)
    clips = [
        load_input(source, model, recipe, clip_index=k, num_clips=num_clips)[0]
        for k in range(1 if _is_detector(model) else num_clips)
    ]
    return query_dependence(model, clips, block, num_queries=num_queries, seed=seed)


def _source_or_first_test_video(source: str | Path | None, model: nn.Module, recipe: DictConfig) -> Path:
    if source is not None:
        return Path(source)
    if _is_detector(model):
        raise ValueError("a detector needs an image to look at: give one (--image)")
    from nlnet.data import build_dataset

    return build_dataset(recipe.data, "test").records[0].path


# -- the built-in set: does the cue look at the object the label depends on? ----------------------------------


@dataclass(frozen=True)
class BuiltinAttentionReport:
    """How often a cue query's strongest key lies on the object whose shape is the label.

    Attributes:
        block: the block measured.
        clips: test clips examined.
        on_target: fraction of them whose top key (for a query at the cue) covers the matching object, in an
            object frame.
        chance: the same fraction for a key drawn uniformly from the key grid (the mean share of keys that
            cover the matching object).
        accuracy: the model's top-1 accuracy on those clips (one centre view).
        multi_object_clips: clips with more than one object (where the cue must pick one among others).
        on_target_multi: ``on_target`` over those clips (NaN without any).
        chance_multi: ``chance`` over those clips.
        figure_index: the test clip drawn: among the clips classified correctly with the top key on target,
            the first with the most objects (else the first clip).
        figure_objects: objects in that clip.
    """

    block: str
    clips: int
    on_target: float
    chance: float
    accuracy: float
    multi_object_clips: int
    on_target_multi: float
    chance_multi: float
    figure_index: int
    figure_objects: int


def builtin_attention_figure(
    checkpoint: str | Path,
    out: str | Path,
    *,
    block: str | None = None,
    max_clips: int = 200,
    style: str = "arrows",
    top_k: int = 3,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> BuiltinAttentionReport:
    """The paper's figure for a model trained on the built-in set, and how often it holds.

    For each test clip (up to ``max_clips``), the query is the centre of the colour cue in the middle frame of
    the cue phase; the label is the shape of the object that wears the cue's colour, shown only in the object
    phase. The clip drawn is one the model classifies correctly and whose strongest key covers that object,
    with the most distractor objects; the report says how often the top key is on target, overall and on the
    clips with several objects, and how often a uniformly random key would be.

    Args:
        checkpoint: a checkpoint trained on the built-in set; its recipe's ``data.root`` is the folder that
            ``nlnet.data.builtin.write_builtin`` made (with the drawn scenes of every clip).
        out: ``.png`` or ``.gif``.
        block: block name; None for the model's last block.
        max_clips: test clips examined.
        style: figure style (see :func:`plot_attention`).
        top_k: keys marked.
        config, overrides: see :func:`load_model`.

    Returns:
        A :class:`BuiltinAttentionReport`.
    """
    import json

    from nlnet.data import build_dataset
    from nlnet.data.builtin import BuiltinConfig, load_scenes

    if max_clips < 1:
        raise ValueError(f"max_clips must be >= 1, got {max_clips}")
    model, recipe = load_model(checkpoint, config=config, overrides=overrides)
    folder = Path(str(recipe.data.root))
    if not (folder / "scenes_test.jsonl").is_file():
        raise ValueError(f"data.root={folder} is not a built-in set folder (no scenes_test.jsonl in it)")
    generator = BuiltinConfig(**json.loads((folder / "settings.json").read_text())["config"])
    records = build_dataset(recipe.data, "test").records[:max_clips]
    scenes = load_scenes(folder, "test")[: len(records)]
    name = block
    hits, chance, correct, objects = [], [], [], []
    best, first = None, None
    crop = int(recipe.data.test_crop)
    to_shown = _builtin_to_shown(generator.size, int(recipe.data.test_scale), crop)
    cue_frame = generator.cue_frames // 2
    for index, (record, scene) in enumerate(zip(records, scenes, strict=True)):
        inputs, frames = load_input(record.path, model, recipe)
        cue = [c + v * cue_frame for c, v in zip(scene.cue_centre, scene.cue_velocity, strict=True)]
        query = (cue_frame, *(min(max(round(to_shown(c)), 0), crop - 1) for c in cue))
        amap = attention_map(model, inputs, query, name)
        name = amap.block
        target = next(obj for obj in scene.objects if obj.colour == scene.cue_colour)
        covers = _covers_object(amap, target, generator.cue_frames, to_shown)
        with torch.no_grad():
            predicted = int(model(inputs[None].to(next(model.parameters()).device)).argmax())
        hits.append(bool(covers.ravel()[int(amap.weights.argmax())]))
        chance.append(float(covers.mean()))
        correct.append(predicted == record.labels[0])
        objects.append(len(scene.objects))
        if first is None:
            first = (index, amap, frames)
        # The clip drawn: right and on target, with as many distractor objects as any such clip has.
        if hits[-1] and correct[-1] and (best is None or objects[-1] > objects[best[0]]):
            best = (index, amap, frames)
    figure_index, amap, frames = best if best is not None else first
    save_attention(amap, frames, out, style=style, top_k=top_k)
    multi = [i for i, count in enumerate(objects) if count > 1]
    return BuiltinAttentionReport(
        block=name,
        clips=len(records),
        on_target=float(np.mean(hits)),
        chance=float(np.mean(chance)),
        accuracy=float(np.mean(correct)),
        multi_object_clips=len(multi),
        on_target_multi=float(np.mean([hits[i] for i in multi])) if multi else float("nan"),
        chance_multi=float(np.mean([chance[i] for i in multi])) if multi else float("nan"),
        figure_index=figure_index,
        figure_objects=objects[figure_index],
    )


def _builtin_to_shown(size: int, test_scale: int, test_crop: int):
    """Maps a generator pixel coordinate to the test crop: resize by test_scale / size, centre crop."""
    factor = test_scale / size
    offset = (test_scale - test_crop) // 2
    return lambda c: (c + 0.5) * factor - 0.5 - offset


def _covers_object(amap: AttentionMap, target, cue_frames: int, to_shown) -> np.ndarray:
    """(T', H', W') bool: key cells that hold the target's centre in one of their object-phase frames."""
    covers = np.zeros(amap.weights.shape, dtype=bool)
    half_t, half_y, half_x = (s / 2 for s in amap.key_span)
    for index in np.ndindex(amap.weights.shape):
        t, y, x = amap.key_centers[index]
        first, last = math.ceil(t - half_t), math.floor(t + half_t)
        for frame in range(max(first, cue_frames), min(last, amap.frame_size[0] - 1) + 1):
            step = frame - cue_frames
            ty = to_shown(target.centre[0] + target.velocity[0] * step)
            tx = to_shown(target.centre[1] + target.velocity[1] * step)
            if abs(ty - y) <= half_y and abs(tx - x) <= half_x:
                covers[index] = True
                break
    return covers
