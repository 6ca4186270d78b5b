"""Figures of an attention map: matplotlib panels (the paper's arrows or a heat map) and animated GIFs.

One panel per key slice of the block (its pooled time steps), the query marked on its own frame; positions are
pixel coordinates of the frames given (``nlnet.viz.attention``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlnet.viz.attention import AttentionMap

__all__ = ["STYLES", "plot_attention", "render_gif_frames", "save_attention"]

STYLES = ("heatmap", "arrows")


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
