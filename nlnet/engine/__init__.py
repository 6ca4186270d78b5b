"""Training and evaluation: config, loop, precise BN, checkpoints, distributed set-up, metrics.

``train``, ``test`` and ``predict`` are imported lazily (they pull in the data pipeline, TensorBoard and tqdm).
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
    "predict",
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
    if name == "predict":
        from nlnet.engine.predict import predict

        # Importing the submodule nlnet.engine.predict bound that name to the module; the function replaces it,
        # so that nlnet.engine.predict stays the function after this first access.
        globals()["predict"] = predict
        return predict
    raise AttributeError(f"module 'nlnet.engine' has no attribute {name!r}")
