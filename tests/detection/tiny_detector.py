"""Detector overrides for the fastest end-to-end runs: a few dozen proposals and RoI samples."""

SMALL_PROPOSALS = [
    "model.overrides.rpn_pre_nms_top_n_train=60",
    "model.overrides.rpn_post_nms_top_n_train=30",
    "model.overrides.rpn_pre_nms_top_n_test=30",
    "model.overrides.rpn_post_nms_top_n_test=10",
    "model.overrides.rpn_batch_size_per_image=32",
    "model.overrides.box_batch_size_per_image=16",
    "model.overrides.box_detections_per_img=5",
]
