"""Getting weights into the video models: 2D ImageNet inflation and the official Caffe2 model zoo."""

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

__all__ = [
    "LoadReport",
    "UnsafePickleError",
    "caffe2_name",
    "convert_caffe2",
    "create_pretrained",
    "export_caffe2",
    "inflate_kernel",
    "is_state_dict",
    "load_2d",
    "load_blobs",
    "load_converted",
    "read_blobs",
]
