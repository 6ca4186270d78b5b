"""Detection with non-local blocks (paper §6): one namespace for the models, data, training and evaluation.

The code lives where the layers of the package put it (``nlnet.models.detection``, ``nlnet.data.coco``,
``nlnet.engine.detection``, ``nlnet.engine.coco_eval``); this module gathers the public names::

    from nlnet import detection

    model = detection.create("maskrcnn_r50_fpn", num_classes=4, min_size=128, max_size=160)
    cfg = detection.load_config("detection/shapes_maskrcnn_r50", ["train.max_iter=50"])
    result = detection.train(cfg)
"""

from nlnet.data.coco import CocoDetection, collate_detection, flip_map_from_names, make_shapes_coco
from nlnet.engine.coco_eval import coco_evaluate, evaluate, predictions_to_coco
from nlnet.engine.detection import evaluate_checkpoint, load_config, measure_cost, train
from nlnet.models.detection import (
    LoadReport,
    available,
    create,
    load_backbone_state_dict,
    load_detector_state_dict,
    nonlocal_blocks,
)

__all__ = [
    "CocoDetection",
    "LoadReport",
    "available",
    "coco_evaluate",
    "collate_detection",
    "create",
    "evaluate",
    "evaluate_checkpoint",
    "flip_map_from_names",
    "load_backbone_state_dict",
    "load_config",
    "load_detector_state_dict",
    "make_shapes_coco",
    "measure_cost",
    "nonlocal_blocks",
    "predictions_to_coco",
    "train",
]
