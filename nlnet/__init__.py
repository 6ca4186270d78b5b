"""nlnet: Non-local Neural Networks (Wang, Girshick, Gupta, He, CVPR 2018) in PyTorch."""

from nlnet.layers import NonLocalBlock

__version__ = "0.1.0"
__all__ = ["NonLocalBlock", "__version__"]
