"""Training and evaluation: config, loop, precise BN, checkpoints, distributed set-up, metrics.

``train`` and ``test`` are imported lazily (they pull in the data pipeline, TensorBoard and tqdm).
"""

from nlnet.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nlnet.engine.config import load_config
from nlnet.engine.distributed import DistContext, cleanup_distributed, setup_distributed

__all__ = [
    "DistContext",
    "cleanup_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "setup_distributed",
    "test",
    "train",
]


def __getattr__(name: str):
    if name == "train":
        from nlnet.engine.train import train

        return train
    if name == "test":
        from nlnet.engine.evaluate import test

        return test
    raise AttributeError(f"module 'nlnet.engine' has no attribute {name!r}")
