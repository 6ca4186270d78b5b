"""Overrides that shrink the built-in recipe to a one-iteration run on a tiny generated set (a few seconds)."""

TINY_BUILTIN = [
    "data.builtin.num_train=8",
    "data.builtin.num_test=4",
    "data.test_clips=1",
    "data.test_crops=1",
    "train.batch_size=4",
    "train.max_iter=1",
    "train.checkpoint_period=1",
    "train.log_period=1",
    "train.num_workers=0",
    "train.precise_bn=false",
    "test.num_workers=0",
]
