"""nlnet: Non-local Neural Networks (Wang, Girshick, Gupta, He, CVPR 2018) in PyTorch."""

from nlnet.layers import NonLocalBlock

__version__ = "0.1.0"
__all__ = ["NonLocalBlock", "__version__", "predict"]


def __getattr__(name: str):
    # Lazy: predicting pulls in the data pipeline and the engine, which `import nlnet` should not.
    if name == "predict":
        from nlnet.engine import predict

        return predict
    raise AttributeError(f"module 'nlnet' has no attribute {name!r}")
