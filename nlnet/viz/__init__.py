"""Pictures of what non-local blocks attend to, and GCNet's query-dependence measure."""

from nlnet.viz.attention import (
    AttentionMap,
    attention_map,
    auto_query,
    block_attention,
    plot_attention,
    query_dependence,
    render_gif_frames,
    save_attention,
)

__all__ = [
    "AttentionMap",
    "attention_map",
    "auto_query",
    "block_attention",
    "plot_attention",
    "query_dependence",
    "render_gif_frames",
    "save_attention",
]
