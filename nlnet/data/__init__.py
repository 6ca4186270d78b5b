"""Video files to clips: PyAV decoding, the paper's clip sampling and transforms, datasets, loaders."""

from nlnet.data.annotations import (
    ANNOTATION_FORMATS,
    AnnotationError,
    VideoRecord,
    class_names_in,
    kinetics400_class_names,
    read_annotations,
)
from nlnet.data.datasets import VideoClipDataset, build_dataset, build_loader, collate_clips, dataset_of_records
from nlnet.data.transforms import EvalViews, TrainAugment
from nlnet.data.video import (
    VideoDecodeError,
    center_clip_indices,
    decode_frames,
    eval_clip_indices,
    train_clip_indices,
)

__all__ = [
    "ANNOTATION_FORMATS",
    "AnnotationError",
    "EvalViews",
    "TrainAugment",
    "VideoClipDataset",
    "VideoDecodeError",
    "VideoRecord",
    "build_dataset",
    "build_loader",
    "center_clip_indices",
    "class_names_in",
    "collate_clips",
    "dataset_of_records",
    "decode_frames",
    "eval_clip_indices",
    "kinetics400_class_names",
    "read_annotations",
    "train_clip_indices",
]
