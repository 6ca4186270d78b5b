"""Video classification datasets: the clip dataset, its construction from a config, batching and data loaders.

The annotation formats are read by `nlnet.data.annotations`. ``build_dataset`` maps class names to indices
through ``class_names`` when given, else through the sorted names of the training annotations (read from
``train_list`` or the training folder so that every split agrees).

Randomness: the augmentation of item ``index`` in epoch ``epoch`` is drawn from
``np.random.SeedSequence((seed, epoch, index))``, never from global or per-worker state. A clip is therefore
the same whatever the worker, the batch order, the number of processes or a resume in the middle of an epoch.
The seed and epoch live in a shared-memory tensor, so ``set_epoch`` reaches persistent DataLoader workers.

Where the spatial transforms run (``augment_on``): ``worker`` cuts, resizes and flips each clip in the loader
worker; ``device`` has the worker decode (and, in training, draw the clip's augmentation) only, and send the
decoded frames with the drawn window or their size, which ``VideoClipDataset.to_device`` turns into clips or
test views on the model's device after the copy. The draws are the same either way, and so are the pixels.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, get_worker_info

from nlnet.data.annotations import ANNOTATION_FORMATS, VideoRecord, class_names_in, read_annotations
from nlnet.data.transforms import KINETICS_MEAN, KINETICS_STD, EvalViews, TrainAugment, normalize_clips
from nlnet.data.video import (
    VideoDecodeError,
    center_clip_indices,
    decode_frames,
    eval_clip_indices,
    train_clip_indices,
)

logger = logging.getLogger(__name__)

__all__ = [
    "VideoClipDataset",
    "build_dataset",
    "build_loader",
    "collate_clips",
    "dataset_of_records",
]

CLIP_MODES = ("train", "center", "test")
AUGMENT_PLACES = ("worker", "device")


# ---------------------------------------------------------------------------------------------------- dataset


class VideoClipDataset(Dataset):
    """Clips of annotated videos, decoded with PyAV and transformed as in the Non-local paper.

    Modes:

    - ``train``: one clip per video, random start (``train_clip_indices``), ``TrainAugment``;
    - ``center``: one clip from the middle of the video, shorter side ``test_scale``, centre crop
      ``test_crop`` (deterministic validation);
    - ``test``: ``num_clips`` clips starting at ``floor(k * n / num_clips)``, each cut into ``num_crops``
      crops (``EvalViews``); views are ordered clip-major: view ``k * num_crops + j`` is crop ``j`` of clip
      ``k``.

    Items are dicts. train/center: ``clip`` float32 (3, T, H, W); test: ``clip`` float32
    (num_clips * num_crops, 3, T, test_crop, test_crop). With ``normalized=False`` the clips are the uint8
    pixels in the same layout (a quarter of the bytes through the loader's shared memory);
    ``nlnet.data.transforms.normalize_clips(clip, dataset.mean, dataset.std)`` gives the float32 clips.
    ``label`` is an int64 scalar, or with ``multi_label``
    a float32 (num_classes,) multi-hot vector; ``index`` is the item index. A video that is missing or cannot
    be decoded is logged as a warning and gives ``{"skipped": str(path), "index": index, "error": why}`` instead.

    Args:
        records: the videos and their labels.
        num_classes: number of classes.
        multi_label: whether labels are multi-hot vectors (Charades) rather than one class index.
        num_frames: frames per clip ``T``.
        sampling_rate: stride ``tau`` between sampled frames.
        mode: ``train``, ``center`` or ``test``.
        jitter_scales: inclusive range of the random shorter side in ``train`` mode.
        train_crop: crop side in ``train`` mode.
        test_scale: shorter side in ``center`` and ``test`` modes.
        test_crop: crop side in ``center`` and ``test`` modes.
        num_clips: temporal clips per video in ``test`` mode.
        num_crops: spatial crops per clip in ``test`` mode.
        mean: normalisation mean in pixel units (one number or RGB).
        std: normalisation standard deviation in pixel units (one number or RGB).
        class_names: optional names of the classes in index order.
        seed: seed of the augmentation randomness (see the module docstring).
        normalized: float32 normalised clips (True) or uint8 pixels (False).
        augment_on: ``worker`` or ``device`` (see the module docstring). With ``device`` an item's ``clip`` is
            the decoded uint8 frames (T, H, W, 3) (all clips' frames in ``test`` mode) with, in ``train`` mode,
            ``window``, its drawn augmentation (``TrainAugment.draw``), else ``frame_size`` (height, width);
            ``to_device`` and ``model_input`` turn a batch of them into clips.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        num_classes: int,
        multi_label: bool = False,
        num_frames: int,
        sampling_rate: int,
        mode: str = "train",
        jitter_scales: Sequence[int] = (256, 320),
        train_crop: int = 224,
        test_scale: int = 256,
        test_crop: int = 256,
        num_clips: int = 10,
        num_crops: int = 3,
        mean: float | Sequence[float] = KINETICS_MEAN,
        std: float | Sequence[float] = KINETICS_STD,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        normalized: bool = True,
        augment_on: str = "worker",
    ) -> None:
        if mode not in CLIP_MODES:
            raise ValueError(f"mode must be one of {CLIP_MODES}, got {mode!r}")
        if augment_on not in AUGMENT_PLACES:
            raise ValueError(f"augment_on must be one of {AUGMENT_PLACES}, got {augment_on!r}")
        if num_frames < 1 or sampling_rate < 1:
            raise ValueError(f"num_frames and sampling_rate must be >= 1, got {num_frames} and {sampling_rate}")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        if not multi_label:
            for record in records:
                if len(record.labels) != 1:
                    raise ValueError(
                        f"{record.path} has labels {record.labels}; single-label data needs exactly one "
                        "(set multi_label for multi-label data)"
                    )
        self.records = list(records)
        self.num_classes = int(num_classes)
        self.multi_label = bool(multi_label)
        self.num_frames = int(num_frames)
        self.sampling_rate = int(sampling_rate)
        self.mode = mode
        self.num_clips = int(num_clips) if mode == "test" else 1
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.mean = mean
        self.std = std
        self.normalized = bool(normalized)
        self.augment_on = augment_on
        self.train_transform = TrainAugment(jitter_scales, train_crop, mean=mean, std=std, normalized=normalized)
        self.eval_views = EvalViews(
            test_scale, test_crop, num_crops if mode == "test" else 1, mean=mean, std=std, normalized=normalized
        )
        # (seed, epoch) in shared memory: persistent DataLoader workers hold copies of the dataset and must
        # see set_epoch calls made in the main process.
        self._rng_state = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.set_seed(seed)
        # (path, choose_indices) -> (frames, n); nlnet.data.cache swaps in frames decoded once.
        self.read_frames: Callable[..., tuple[np.ndarray, int]] = decode_frames

    @property
    def seed(self) -> int:
        """Seed of the augmentation randomness."""
        return int(self._rng_state[0])

    @property
    def epoch(self) -> int:
        """Epoch whose augmentation the items are drawn from."""
        return int(self._rng_state[1])

    def set_seed(self, seed: int) -> None:
        """Set the augmentation seed (a non-negative integer)."""
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._rng_state[0] = int(seed)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of the following items from epoch ``epoch`` (a non-negative integer)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._rng_state[1] = int(epoch)

    @property
    def num_views(self) -> int:
        """Views per video in ``test`` mode (clips x crops); 1 otherwise."""
        return self.num_clips * self.eval_views.num_crops

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            clip = self._load_clip(record.path, index)
        except VideoDecodeError as error:
            logger.warning("skipping video %s: %s", record.path, error)
            return {"skipped": str(record.path), "index": index, "error": str(error)}
        return {**clip, "label": self._label(record), "index": index}

    def to_device(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """The clips (or test views) of a batch from ``collate_clips`` on ``device``, as the items would hold
        them with ``augment_on="worker"``: decoded frames sent with their windows or sizes are cut there.

        Returns:
            train/center: (B, 3, T, H, W); test: (B, num_views, 3, T, test_crop, test_crop); uint8 unless the
            dataset is ``normalized``.
        """
        clip = batch["clip"].to(device, non_blocking=True)
        if batch.get("window") is not None:
            return self.train_transform.apply_batch(clip, batch["window"])
        if batch.get("frame_size") is not None:
            views = torch.stack(
                [
                    self.eval_views(frames[:, :height, :width], self.num_clips)
                    for frames, (height, width) in zip(clip, batch["frame_size"].tolist(), strict=True)
                ]
            )
            return views if self.mode == "test" else views[:, 0]
        return clip

    def model_input(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """The float32 clips of a batch from ``collate_clips`` on ``device``, ready for the network: those of
        ``to_device``, normalised there."""
        clip = self.to_device(batch, device)
        return clip if clip.dtype != torch.uint8 else normalize_clips(clip, self.mean, self.std)

    def _load_clip(self, path: Path, index: int) -> dict[str, torch.Tensor]:
        """``{"clip": ...}``, or the decoded frames with ``window`` or ``frame_size`` (``augment_on="device"``)."""
        frames_per_clip, rate = self.num_frames, self.sampling_rate
        on_device = self.augment_on == "device"
        # One decoding thread in a loader worker (there is a worker per core), FFmpeg's choice in the main process.
        threads = 1 if get_worker_info() is not None else 0
        if self.mode == "train":
            temporal_seed, spatial_seed = np.random.SeedSequence((self.seed, self.epoch, index)).spawn(2)
            frames, _ = self.read_frames(
                path,
                lambda n: train_clip_indices(n, frames_per_clip, rate, np.random.default_rng(temporal_seed)),
                threads=threads,
            )
            frames, spatial_rng = torch.from_numpy(frames), np.random.default_rng(spatial_seed)
            if on_device:
                return {"clip": frames, "window": self.train_transform.draw(*frames.shape[1:3], spatial_rng)}
            return {"clip": self.train_transform(frames, spatial_rng)}
        if self.mode == "center":
            frames, _ = self.read_frames(
                path, lambda n: center_clip_indices(n, frames_per_clip, rate), threads=threads
            )
            frames = torch.from_numpy(frames)
            if on_device:
                return {"clip": frames, "frame_size": torch.tensor(frames.shape[1:3])}
            return {"clip": self.eval_views(frames)[0]}
        num_clips = self.num_clips
        frames, _ = self.read_frames(
            path,
            lambda n: np.concatenate(
                [eval_clip_indices(n, frames_per_clip, rate, k, num_clips) for k in range(num_clips)]
            ),
            threads=threads,
        )
        frames = torch.from_numpy(frames)
        if on_device:
            return {"clip": frames, "frame_size": torch.tensor(frames.shape[1:3])}
        return {"clip": self.eval_views(frames, num_clips)}

    def _label(self, record: VideoRecord) -> torch.Tensor:
        if self.multi_label:
            target = torch.zeros(self.num_classes, dtype=torch.float32)
            target[list(record.labels)] = 1.0
            return target
        return torch.tensor(record.labels[0], dtype=torch.int64)


def build_dataset(
    data_cfg: Mapping[str, Any], split: str, *, normalized: bool = True, augment_on: str = "worker"
) -> VideoClipDataset:
    """Build the dataset of one split from the ``data`` section of a config.

    Keys (defaults in brackets): ``format`` (see ``ANNOTATION_FORMATS``), ``root``, ``train_list``,
    ``val_list``, ``test_list`` (annotation files; not used by ``folder``), ``num_classes``, ``multi_label``
    [false], ``num_frames``, ``sampling_rate``, ``train_jitter_scales`` [[256, 320]], ``train_crop`` [224],
    ``test_scale`` [256], ``test_crop`` [256], ``test_clips`` [10], ``test_crops`` [3], ``mean`` [114.75],
    ``std`` [57.375], ``class_names`` [from the training annotations], ``val_mode`` ["center": one middle
    clip, centre crop; "train_like": the training augmentation, as in the paper's validation curves].
    Other keys are ignored.

    Args:
        data_cfg: mapping or OmegaConf ``DictConfig`` with the keys above.
        split: ``train``, ``val`` or ``test``.
        normalized: float32 normalised clips, or uint8 pixels (``VideoClipDataset``'s ``normalized``).
        augment_on: where the training augmentation runs (``VideoClipDataset``'s ``augment_on``).

    Returns:
        a ``VideoClipDataset`` in ``train`` mode for ``train``, ``center`` or ``train`` mode for ``val``
        (``val_mode``), ``test`` mode for ``test``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    for key in ("format", "root", "num_classes", "num_frames", "sampling_rate"):
        if data_cfg.get(key) is None:
            raise ValueError(f"data config lacks the key {key!r}")
    fmt = str(data_cfg["format"])
    if fmt not in ANNOTATION_FORMATS:
        raise ValueError(f"data.format must be one of {ANNOTATION_FORMATS}, got {fmt!r}")
    val_mode = str(data_cfg.get("val_mode", "center"))
    if val_mode not in ("center", "train_like"):
        raise ValueError(f"data.val_mode must be 'center' or 'train_like', got {val_mode!r}")
    root = Path(str(data_cfg["root"]))
    num_classes = int(data_cfg["num_classes"])
    source = _annotation_source(data_cfg, fmt, root, split)
    if source is None:
        raise ValueError(f"data config lacks '{split}_list', the annotation file of the {split} split")
    class_names = data_cfg.get("class_names")
    if class_names is not None:
        class_names = [str(name) for name in class_names]
    elif fmt != "charades":
        # Index classes by the training annotations so that every split maps names the same way.
        train_source = _annotation_source(data_cfg, fmt, root, "train")
        if train_source is None:
            logger.warning("no train_list: class indices come from the sorted class names of %s", source)
            train_source = source
        class_names = class_names_in(train_source, fmt)
    records = read_annotations(source, fmt, root, num_classes, class_names=class_names)
    mode = {"train": "train", "val": "center" if val_mode == "center" else "train", "test": "test"}[split]
    return dataset_of_records(
        records,
        data_cfg,
        mode,
        multi_label=bool(data_cfg.get("multi_label", False)),
        class_names=class_names,
        normalized=normalized,
        augment_on=augment_on,
    )


def dataset_of_records(
    records: Sequence[VideoRecord],
    data_cfg: Mapping[str, Any],
    mode: str,
    *,
    multi_label: bool,
    class_names: Sequence[str] | None = None,
    normalized: bool = True,
    augment_on: str = "worker",
) -> VideoClipDataset:
    """A ``VideoClipDataset`` over ``records`` with the clip and view settings of a config's ``data`` section.

    ``build_dataset`` reads the records from an annotation file; a caller with its own list of videos (such as
    ``nlnet.engine.predict``) passes them here and gets exactly the same decoding and views.

    Args:
        records: the videos and their labels.
        data_cfg: the ``data`` keys of ``build_dataset`` (``num_classes``, ``num_frames``, ``test_clips``, ...).
        mode: ``train``, ``center`` or ``test`` (``VideoClipDataset``'s modes).
        multi_label: labels are multi-hot vectors (``VideoClipDataset``'s ``multi_label``).
        class_names: names of the classes in index order, or None.
        normalized: float32 normalised clips, or uint8 pixels.
        augment_on: where the training augmentation runs.
    """
    return VideoClipDataset(
        records,
        num_classes=int(data_cfg["num_classes"]),
        multi_label=multi_label,
        num_frames=int(data_cfg["num_frames"]),
        sampling_rate=int(data_cfg["sampling_rate"]),
        mode=mode,
        jitter_scales=[int(s) for s in data_cfg.get("train_jitter_scales", (256, 320))],
        train_crop=int(data_cfg.get("train_crop", 224)),
        test_scale=int(data_cfg.get("test_scale", 256)),
        test_crop=int(data_cfg.get("test_crop", 256)),
        num_clips=int(data_cfg.get("test_clips", 10)),
        num_crops=int(data_cfg.get("test_crops", 3)),
        mean=_number_or_list(data_cfg.get("mean", KINETICS_MEAN)),
        std=_number_or_list(data_cfg.get("std", KINETICS_STD)),
        class_names=class_names,
        normalized=normalized,
        augment_on=augment_on,
    )


def _annotation_source(data_cfg: Mapping[str, Any], fmt: str, root: Path, split: str) -> Path | None:
    """The annotation file of ``split`` (None when the config lists none), or its folder for ``folder``."""
    if fmt == "folder":
        if (root / split).is_dir():
            return root / split
        present = [name for name in ("train", "val", "test") if (root / name).is_dir()]
        if present:
            raise FileNotFoundError(
                f"{root} has split folders {present} but no '{split}' folder: use one of those splits "
                f"(e.g. nlnet test --split {present[-1]}) or add {root / split}"
            )
        return root
    listed = data_cfg.get(f"{split}_list")
    return None if listed is None else Path(str(listed))


def _number_or_list(value: Any) -> float | list[float]:
    if isinstance(value, (int, float)):
        return float(value)
    return [float(v) for v in value]


# --------------------------------------------------------------------------------------------------- batching


def collate_clips(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dataset items, dropping the skipped ones.

    Args:
        items: dataset items, each ``{"clip", "label", "index"}`` (with ``"window"`` or ``"frame_size"``
            when the transforms run on the device) or ``{"skipped", "index"}``.

    Returns:
        ``clip``: stacked clips (B, ...) or None when every item was skipped (source frames of different sizes
        are padded); ``window``: (B, 9) drawn augmentations, or None; ``frame_size``: (B, 2) sizes of the
        decoded frames, or None; ``label``: (B,) int64 or
        (B, num_classes) float32, or None; ``index``: (B,) int64 indices of the kept items; ``skipped``: the
        paths of the skipped videos.
    """
    kept = [item for item in items if "skipped" not in item]
    extras = {key: [item[key] for item in kept if key in item] for key in ("window", "frame_size")}
    stack = _stack_padded if any(extras.values()) else torch.stack
    return {
        "clip": stack([item["clip"] for item in kept]) if kept else None,
        **{key: torch.stack(values) if values else None for key, values in extras.items()},
        "label": torch.stack([item["label"] for item in kept]) if kept else None,
        "index": torch.tensor([int(item["index"]) for item in kept], dtype=torch.int64),
        "skipped": [str(item["skipped"]) for item in items if "skipped" in item],
    }


def _stack_padded(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack source clips (T, H, W, 3) of different sizes at the top left of the largest; the rest is zero.

    The windows drawn for a clip lie inside its own frames, and views are cut from ``frame_size``: the padding
    is never read.
    """
    height = max(clip.shape[1] for clip in frames)
    width = max(clip.shape[2] for clip in frames)
    if all(clip.shape[1:3] == (height, width) for clip in frames):
        return torch.stack(list(frames))
    batch = frames[0].new_zeros((len(frames), frames[0].shape[0], height, width, 3))
    for slot, clip in zip(batch, frames, strict=True):
        slot[:, : clip.shape[1], : clip.shape[2]] = clip
    return batch


class _EpochShuffleSampler(Sampler[int]):
    """Random order that is a function of (seed, dataset.epoch), so a resumed run sees the same order."""

    def __init__(self, dataset: VideoClipDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng((self.seed, self.dataset.epoch)).permutation(len(self.dataset))
        return iter(order.tolist())


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed drawn from the loader's generator); numpy
    # and random follow it so that any code relying on the global generators is reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> DataLoader:
    """A DataLoader that batches with ``collate_clips``, with reproducible order and augmentation.

    ``seed`` becomes the dataset's augmentation seed (datasets with ``set_seed``), seeds the shuffling and the
    workers' numpy/random generators. With ``shuffle`` and a ``VideoClipDataset``, epoch ``e``'s order is a
    function of ``(seed, e)`` where ``e`` is set by ``dataset.set_epoch``; so is every clip's augmentation.
    A ``DistributedSampler`` passed as ``sampler`` needs its own ``set_epoch``.

    Args:
        dataset: the dataset.
        batch_size: items per batch (skipped items make a batch smaller).
        shuffle: random order each epoch; must be False when ``sampler`` is given.
        num_workers: worker processes (0: load in the main process).
        sampler: optional sampler, e.g. ``DistributedSampler``.
        seed: seed of order and augmentation.
        drop_last: drop the last incomplete batch.
        pin_memory: pin batches in page-locked memory, so that ``non_blocking`` host-to-GPU copies are
            asynchronous (from pageable memory they block).
        persistent_workers: keep the workers alive between epochs (with ``num_workers > 0``); a loader read
            once in a while (validation, precise BN) should not, so its workers do not sit idle holding memory.

    Returns:
        the DataLoader.
    """
    if sampler is not None and shuffle:
        raise ValueError("shuffle must be False when a sampler is given (the sampler decides the order)")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    set_seed: Callable[[int], None] | None = getattr(dataset, "set_seed", None)
    if set_seed is not None:
        set_seed(seed)
    if shuffle:
        if isinstance(dataset, VideoClipDataset):
            sampler = _EpochShuffleSampler(dataset, seed)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_clips,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=persistent_workers and num_workers > 0,
    )
