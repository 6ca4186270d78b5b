"""Getting weights into the video models: 2D ImageNet inflation, the official Caffe2 zoo, mmaction2, PySlowFast."""

from nlnet.weights.caffe2 import (
    UnsafePickleError,
    caffe2_name,
    convert_caffe2,
    export_caffe2,
    load_blobs,
    load_converted,
    read_blobs,
)
from nlnet.weights.inflate import LoadReport, create_pretrained, inflate_kernel, is_state_dict, load_2d
from nlnet.weights.mmaction2 import convert_mmaction2, read_mmaction2
from nlnet.weights.pyslowfast import convert_pyslowfast, pyslowfast_name, read_pyslowfast

__all__ = [
    "LoadReport",
    "UnsafePickleError",
    "caffe2_name",
    "convert_caffe2",
    "convert_mmaction2",
    "convert_pyslowfast",
    "create_pretrained",
    "export_caffe2",
    "inflate_kernel",
    "is_state_dict",
    "load_2d",
    "load_blobs",
    "load_converted",
    "pyslowfast_name",
    "read_blobs",
    "read_mmaction2",
    "read_pyslowfast",
]
