"""Pictures of what non-local blocks attend to, and GCNet's query-dependence measure."""

from nlnet.viz.attention import AttentionMap, attention_map, auto_query, block_attention, query_dependence
from nlnet.viz.drawing import plot_attention, render_gif_frames, save_attention
from nlnet.viz.files import load_input, load_model, measure_query_dependence, save_attention_figure
from nlnet.viz.report import BuiltinAttentionReport, builtin_attention_figure

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
