"""The built-in video data set: a long-range binding task that a C2D network cannot solve without non-local blocks.

Each clip has two phases. In the first ``cue_frames`` frames a large patch of one colour, the *cue*, fills the
view. In the remaining frames the cue is gone and ``k`` objects appear, one in each of ``k`` quadrants, every one
a different shape (square, disc, triangle, plus) in a different colour (red, green, blue, yellow); objects drift
slowly. Exactly one object wears the cue's colour, and the label is that object's shape.

Why a C2D baseline cannot solve it: every convolution of C2D is 1 x k x k and its pool2 (kernel 2 x 1 x 1,
stride 2) never joins a cue frame with an object frame when ``cue_frames`` is even, so until the global average
pool the network sees the cue and the objects separately, and its linear classifier adds a score of the cue
phase to a score of the object phase. No such sum is right on all four clips of a quartet (two objects, their
colours swapped, under either cue colour): the four inequalities it would need add up to a contradiction, so
with two objects it is wrong at least a quarter of the time. In practice the baseline learns to recognise the
shapes and does little better than guessing among those on screen: right with one object, 1/k of the time with
k (52 % on average when k is uniform in 1..4). A non-local block lets a position of the cue phase attend to the
object of the same colour and carry its shape back: the relation is between things far apart in time and, as
the cue covers the view, anywhere in space.

Why clips with a single object are kept (``min_objects = 1``): they are where both networks learn what the
shapes look like and how the classifier reads them; with two or more objects in every clip neither network
rose above chance within 6 epochs of 4000 clips (measured while designing the set).

Everything is drawn from ``numpy.random.SeedSequence((seed, split, index))``: a clip does not depend on how
many clips are generated or in which order, and the training and test splits never share a stream. Every
clip's drawn parameters are kept as a `Scene`, so the label can be re-derived (`scene_label`) from what was
drawn, and `render_scene` is a pure function of the scene.

Two ways to use it:

- `generate_clips`: uint8 arrays in memory, for experiments (``benchmarks/builtin_gap.py``);
- `write_builtin`: H.264 mp4 files (PyAV, libx264) plus ``train.csv`` / ``test.csv`` annotation files in the
  ``path_csv`` format of `nlnet.data.annotations` (rows ``path,label``, label = class index), in a cache folder
  named after a hash of every setting, written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np

__all__ = [
    "BuiltinConfig",
    "COLOURS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "default_cache_dir",
    "draw_scene",
    "generate_clips",
    "load_scenes",
    "render_scene",
    "scene_label",
    "write_builtin",
]

# Bump when the drawing rules change, so that old cache folders are not reused.
GENERATOR_VERSION = 2

SHAPES = ("square", "disc", "triangle", "plus")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 40),
}
_COLOUR_VALUES = np.array(list(COLOURS.values()), dtype=np.float32)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class BuiltinConfig:
    """Settings of the generator.

    Attributes:
        num_frames: frames per clip.
        size: frame height and width in pixels (even, so that a 4:2:0 encoding is possible).
        cue_frames: frames of the cue phase at the start (even, so pool2 never mixes the two phases).
        min_objects: fewest objects in the object phase (>= 1).
        max_objects: most objects in the object phase (<= 4, one per quadrant).
        fps: frame rate written into the mp4 files.
        crf: libx264 constant rate factor of the mp4 files (lower = closer to the drawn frames; 0 is lossless).
        pix_fmt: ``"yuv444p"`` (full-resolution colour) or ``"yuv420p"`` (colour at half the resolution, what
            most video files use).

    The default, lossless 4:4:4, decodes to the drawn frames up to the RGB-YUV rounding (mean error 0.4 grey
    levels, 99th percentile 1). At 32 x 32 pixels 4:2:0 colour bleeds across object edges (99th percentile 57
    grey levels at crf 18), and the colour is what binds the cue to its object: the in-memory harness
    (``benchmarks/builtin_gap.py --source mp4``) reached 70 % after 5 epochs from such files where it reached
    94 % from lossless ones and 96 % from the drawn frames (seed 0).
    """

    num_frames: int = 8
    size: int = 32
    cue_frames: int = 4
    min_objects: int = 1
    max_objects: int = 4
    fps: int = 8
    crf: int = 0
    pix_fmt: str = "yuv444p"

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number >= 16, got {self.size}")
        if self.cue_frames < 2 or self.cue_frames % 2:
            raise ValueError(f"cue_frames must be an even number >= 2, got {self.cue_frames}")
        if self.num_frames <= self.cue_frames:
            raise ValueError(
                f"num_frames must exceed cue_frames ({self.cue_frames}) to leave an object phase, got {self.num_frames}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(SHAPES)}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if self.pix_fmt not in ("yuv444p", "yuv420p"):
            raise ValueError(f"pix_fmt must be 'yuv444p' or 'yuv420p', got {self.pix_fmt!r}")


@dataclass(frozen=True)
class SceneObject:
    """One object of the object phase: what it is and where it is at the first object frame.

    Attributes:
        shape: index into `SHAPES`.
        colour: index into `COLOURS`.
        quadrant: 0..3 (row-major: top-left, top-right, bottom-left, bottom-right).
        centre: (y, x) in pixels at the first frame of the object phase.
        velocity: (dy, dx) in pixels per frame.
        radius: half-extent in pixels.
    """

    shape: int
    colour: int
    quadrant: int
    centre: tuple[float, float]
    velocity: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """Every parameter drawn for one clip; `render_scene` turns it into pixels, `scene_label` into the label.

    Attributes:
        cue_colour: index into `COLOURS` of the cue.
        cue_centre: (y, x) of the cue disc at frame 0.
        cue_velocity: (dy, dx) of the cue disc in pixels per frame.
        cue_radius: radius of the cue disc in pixels (large: it covers most of the frame).
        objects: the objects of the object phase.
        background: RGB of the background.
        noise_seed: seed of the pixel noise and colour jitter.
    """

    cue_colour: int
    cue_centre: tuple[float, float]
    cue_velocity: tuple[float, float]
    cue_radius: float
    objects: tuple[SceneObject, ...]
    background: tuple[float, float, float]
    noise_seed: int = field(default=0)


def scene_label(scene: Scene) -> int:
    """The label rule: the shape of the object whose colour is the cue's colour.

    Raises:
        ValueError: when not exactly one object wears the cue's colour.
    """
    matches = [obj.shape for obj in scene.objects if obj.colour == scene.cue_colour]
    if len(matches) != 1:
        raise ValueError(f"the cue colour {scene.cue_colour} is worn by {len(matches)} objects, expected 1")
    return matches[0]


def draw_scene(rng: np.random.Generator, config: BuiltinConfig) -> Scene:
    """Draw the parameters of one clip.

    Shapes, colours and quadrants are distinct among the objects; the cue takes the colour of one object chosen
    uniformly, so the label is uniform over the shapes.
    """
    size = float(config.size)
    half = size / 2
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = rng.permutation(len(SHAPES))[:count]
    colours = rng.permutation(len(COLOURS))[:count]
    quadrants = rng.permutation(4)[:count]
    objects = []
    steps = config.num_frames - config.cue_frames - 1
    for shape, colour, quadrant in zip(shapes, colours, quadrants, strict=True):
        radius = float(rng.uniform(0.30, 0.40) * half)
        # Start and end points anywhere the whole shape stays inside its quadrant, so objects never touch.
        corner = np.array([(quadrant // 2) * half, (quadrant % 2) * half])
        start, end = corner + rng.uniform(radius + 0.5, half - radius - 0.5, (2, 2))
        velocity = (end - start) / max(steps, 1)
        objects.append(
            SceneObject(
                int(shape),
                int(colour),
                int(quadrant),
                (float(start[0]), float(start[1])),
                (float(velocity[0]), float(velocity[1])),
                radius,
            )
        )
    cue_radius = float(rng.uniform(0.55, 0.75) * size)
    cue_centre = tuple(float(v) for v in rng.uniform(0.3 * size, 0.7 * size, 2))
    cue_velocity = tuple(float(v) for v in rng.uniform(-1.0, 1.0, 2))
    background = tuple(float(v) for v in rng.uniform(20, 70) + rng.uniform(-8, 8, 3))
    return Scene(
        cue_colour=int(colours[rng.integers(count)]),
        cue_centre=cue_centre,
        cue_velocity=cue_velocity,
        cue_radius=cue_radius,
        objects=tuple(objects),
        background=background,
        noise_seed=int(rng.integers(2**31)),
    )


def _shape_mask(shape: int, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape from the offsets (dy, dx) of every pixel to its centre."""
    if shape == 0:  # square
        return (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    if shape == 1:  # disc
        return dy * dy + dx * dx <= radius * radius
    if shape == 2:  # triangle, apex up
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    arm = radius * 0.35  # plus
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))


def render_scene(scene: Scene, config: BuiltinConfig) -> np.ndarray:
    """Draw a scene.

    Returns:
        uint8 RGB frames of shape (num_frames, size, size, 3).
    """
    rng = np.random.default_rng(scene.noise_seed)
    frames_count, size, cue_frames = config.num_frames, config.size, config.cue_frames
    video = np.empty((frames_count, size, size, 3), dtype=np.float32)
    video[:] = np.asarray(scene.background, dtype=np.float32)
    video += rng.normal(0.0, 4.0, video.shape).astype(np.float32)
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)

    cue_rgb = _COLOUR_VALUES[scene.cue_colour] + rng.normal(0.0, 6.0, 3).astype(np.float32)
    for t in range(cue_frames):
        dy = grid_y - (scene.cue_centre[0] + scene.cue_velocity[0] * t)
        dx = grid_x - (scene.cue_centre[1] + scene.cue_velocity[1] * t)
        video[t][dy * dy + dx * dx <= scene.cue_radius**2] = cue_rgb

    for obj in scene.objects:
        rgb = _COLOUR_VALUES[obj.colour] + rng.normal(0.0, 6.0, 3).astype(np.float32)
        for step, t in enumerate(range(cue_frames, frames_count)):
            dy = grid_y - (obj.centre[0] + obj.velocity[0] * step)
            dx = grid_x - (obj.centre[1] + obj.velocity[1] * step)
            video[t][_shape_mask(obj.shape, dy, dx, obj.radius)] = rgb
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def _clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence((int(seed), SPLITS.index(split), int(index))))


def generate_clips(
    num_clips: int, *, seed: int = 0, split: str = "train", config: BuiltinConfig | None = None
) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """Generate clips in memory.

    Args:
        num_clips: number of clips.
        seed: data seed; clip ``i`` of a split depends only on (seed, split, i).
        split: ``train`` or ``test`` (independent random streams).
        config: generator settings (default `BuiltinConfig()`).

    Returns:
        clips: uint8 array (num_clips, num_frames, size, size, 3), RGB.
        labels: int64 array (num_clips,), shape indices.
        scenes: the drawn `Scene` of every clip.
    """
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    config = config or BuiltinConfig()
    clips = np.empty((num_clips, config.num_frames, config.size, config.size, 3), dtype=np.uint8)
    labels = np.empty(num_clips, dtype=np.int64)
    scenes = []
    for index in range(num_clips):
        scene = draw_scene(_clip_rng(seed, split, index), config)
        clips[index] = render_scene(scene, config)
        labels[index] = scene_label(scene)
        scenes.append(scene)
    return clips, labels, scenes


def encode_mp4(
    path: str | os.PathLike, frames: np.ndarray, *, fps: int, crf: int, pix_fmt: str = "yuv420p"
) -> None:
    """Write RGB frames (T, H, W, 3) uint8 as an H.264 mp4 (``pix_fmt``: yuv420p or yuv444p) with PyAV.

    One encoder thread, the muxer's bitexact flag (no creation time, no library version in the header) and
    x264's macroblock tree turned off keep the bytes identical from run to run: with ``mbtree`` on, about one
    encode in a hundred of these small clips came out different when repeated in the same process.
    """
    options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
    with av.open(os.fspath(path), mode="w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def default_cache_dir() -> Path:
    """``$NLNET_CACHE/builtin`` if set, else ``~/.cache/nlnet/builtin``."""
    base = os.environ.get("NLNET_CACHE")
    return Path(base) / "builtin" if base else Path.home() / ".cache" / "nlnet" / "builtin"


def _settings(config: BuiltinConfig, num_train: int, num_test: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "num_train": num_train,
        "num_test": num_test,
        "seed": seed,
        "pyav": av.__version__,
    }


def write_builtin(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 6000,
    num_test: int = 1000,
    seed: int = 0,
    config: BuiltinConfig | None = None,
    workers: int | None = None,
) -> Path:
    """Write the data set as mp4 files with ``train.csv`` and ``test.csv`` (``path,label``), once.

    The folder ``<root>/<hash of every setting>`` holds ``videos/{train,test}/<index>.mp4``, the two
    annotation files (paths relative to the folder), ``classes.txt`` (shape names in label order),
    ``settings.json`` and ``scenes_{train,test}.jsonl`` (the drawn parameters of every clip). It is
    built in a temporary sibling folder and renamed into place, so a folder that exists is complete; a second
    call with the same settings returns it without work.

    Args:
        root: parent folder (default `default_cache_dir()`).
        num_train: training clips.
        num_test: test clips (drawn from an independent stream).
        seed: data seed.
        config: generator settings (default `BuiltinConfig()`).
        workers: processes that encode the mp4 files (None: one per usable core). The files are the same
            whatever the number: each is encoded alone, on one thread, from its own scene.

    Returns:
        the data set folder; use it as ``data.root`` with ``format: path_csv``.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    config = config or BuiltinConfig()
    settings = _settings(config, num_train, num_test, seed)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    parent = Path(root) if root is not None else default_cache_dir()
    target = parent / digest
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    # A whole folder appears at once: its files are written into a private staging folder that one rename
    # publishes, so no file inside needs an atomic write of its own (nlnet.utils.io handles single files).
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=parent))
    try:
        with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
            for split, count in (("train", num_train), ("test", num_test)):
                _write_split(staging, split, count, seed, config, pool)
        (staging / "classes.txt").write_text("\n".join(SHAPES) + "\n")
        (staging / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same folder first; its content is identical.
            if not target.is_dir():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_split(folder: Path, split: str, count: int, seed: int, config: BuiltinConfig, pool) -> None:
    videos = folder / "videos" / split
    videos.mkdir(parents=True)
    width = max(6, len(str(count - 1)))
    scenes = [draw_scene(_clip_rng(seed, split, index), config) for index in range(count)]
    paths = [folder / f"videos/{split}/{index:0{width}d}.mp4" for index in range(count)]
    encode = functools.partial(_encode_scene, config=config)
    # Each process takes a few hundred clips at a time: a clip costs about 10 ms, a round trip much less.
    mapped = map(encode, paths, scenes) if pool is None else pool.map(encode, paths, scenes, chunksize=256)
    for _ in mapped:
        pass
    with open(folder / f"{split}.csv", "w", newline="") as annotations:
        writer = csv.writer(annotations)
        writer.writerow(["path", "label"])
        rows = zip(paths, scenes, strict=True)
        writer.writerows([path.relative_to(folder).as_posix(), scene_label(scene)] for path, scene in rows)
    with open(folder / f"scenes_{split}.jsonl", "w") as handle:
        handle.writelines(json.dumps(asdict(scene)) + "\n" for scene in scenes)


def _encode_scene(path: Path, scene: Scene, config: BuiltinConfig) -> None:
    encode_mp4(path, render_scene(scene, config), fps=config.fps, crf=config.crf, pix_fmt=config.pix_fmt)


def load_scenes(folder: str | os.PathLike, split: str) -> list[Scene]:
    """Read back the scenes that `write_builtin` recorded for a split."""
    scenes = []
    with open(Path(folder) / f"scenes_{split}.jsonl") as handle:
        for line in handle:
            raw = json.loads(line)
            raw["objects"] = tuple(
                SceneObject(**{**obj, "centre": tuple(obj["centre"]), "velocity": tuple(obj["velocity"])})
                for obj in raw["objects"]
            )
            for key in ("cue_centre", "cue_velocity", "background"):
                raw[key] = tuple(raw[key])
            scenes.append(Scene(**raw))
    return scenes
