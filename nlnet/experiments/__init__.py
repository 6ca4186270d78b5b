"""The studies on the built-in set: ``nlnet demo`` (C2D vs NL C2D) and ``nlnet ablate`` (Table 2 in miniature).

They call `nlnet.engine` and `nlnet.viz` as any user script would; nothing in the package but the CLI imports
them.
"""

from nlnet.experiments.ablate import ABLATION_AXES, AblationRow, ablate, format_ablation
from nlnet.experiments.demo import demo, demo_seeds

__all__ = ["ABLATION_AXES", "AblationRow", "ablate", "demo", "demo_seeds", "format_ablation"]
