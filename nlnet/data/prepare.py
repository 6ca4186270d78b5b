"""Re-encode a video collection for fast training reads: short side resized, a key frame every k frames.

``prepare_videos`` does with PyAV what ``ffmpeg -i in -vf scale=-2:256 -g 32 -bf 7 -c:v libx264 out.mp4`` does by hand,
over a folder tree or an annotation list, in parallel:

- the short side becomes ``short_side`` and the long side keeps the aspect ratio, rounded to an even size
  (yuv420p halves the chroma planes);
- a key frame every ``keyframe_interval`` frames exactly: ``gop_size`` alone lets x264 insert key frames at
  scene cuts and place them anywhere within the GOP, so ``keyint = min-keyint = k`` and ``scenecut=0`` pin them;
- ``bframes`` non-reference B-frames between reference frames (B-pyramid and adaptive placement off, so the
  pattern is fixed): the decoder skips such a frame when a clip does not show it (``nlnet.data.video``), and
  an 8x8 clip decodes 18 frames on average, key frame included, for the 57 it spans with the default 7;
- every frame is kept, so clip sampling by frame index sees the same video; ``fps`` resamples to a constant
  rate instead (output frame ``j`` shows the input frame on screen at ``j / fps``, input frames taken as evenly
  spaced at the stream's average rate). Audio is dropped.

Outputs are written to a temporary name in their folder and renamed when complete, so an output that exists is
a finished one: a second run skips it, and a killed run resumes where it stopped. A video that cannot be
decoded is listed (``DST/failed.txt``, ``path<TAB>reason``) and the others are still written.
``DST/prepared.csv`` lists the outputs in ``path_csv`` form (``path,label``, paths relative to DST) with the
source's labels; for a folder source the class-folder layout is kept, so DST also reads as ``folder`` format.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import PictureType
from tqdm import tqdm

from nlnet.data.annotations import VIDEO_EXTENSIONS, class_names_in, read_annotations
from nlnet.utils.io import atomic_write

__all__ = ["PREPARED_LIST", "FAILED_LIST", "PrepareResult", "prepare_videos"]

PREPARED_LIST = "prepared.csv"
FAILED_LIST = "failed.txt"
# Annotation lists hold class indices that read_annotations range-checks against num_classes; the prepared list
# copies them as they are, so any non-negative index passes.
_ANY_INDEX = 2**62


@dataclass(frozen=True)
class _Job:
    source: Path
    output: Path
    short_side: int
    keyframe_interval: int
    bframes: int
    fps: Fraction | None
    threads: int
    mode: int


@dataclass
class PrepareResult:
    """What a ``prepare_videos`` run did; every path is a source video except ``annotations``."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    annotations: Path | None = None


def prepare_videos(
    src: str | Path,
    dst: str | Path,
    *,
    format: str | None = None,
    root: str | Path | None = None,
    short_side: int = 256,
    keyframe_interval: int = 32,
    bframes: int = 7,
    fps: float | Fraction | None = None,
    workers: int = 1,
    progress: bool = True,
) -> PrepareResult:
    """Re-encode the videos of ``src`` into ``dst`` as H.264 mp4 (see the module docstring).

    Args:
        src: a folder (searched recursively for video files) or an annotation list.
        dst: output folder; outputs keep their path relative to ``src`` (or ``root``), with the suffix ``.mp4``.
        format: ``path_csv`` or ``kinetics_csv`` for an annotation list (default: ``kinetics_csv`` when its
            header has a ``youtube_id`` column, else ``path_csv``); ignored for a folder.
        root: folder the list's video paths are relative to (default: the list's folder).
        short_side: target size of the shorter side, even.
        keyframe_interval: frames from one key frame to the next.
        bframes: non-reference B-frames between two reference frames; 0 makes every frame a reference.
        fps: output frame rate; ``None`` keeps every frame at the source rate.
        workers: encoding processes; 1 encodes in this process.
        progress: show a tqdm bar.

    Returns:
        the written, skipped (already there) and failed sources, and the path of ``prepared.csv``.
    """
    if short_side < 2 or short_side % 2:
        raise ValueError(f"short_side must be an even size >= 2, got {short_side}")
    if keyframe_interval < 1:
        raise ValueError(f"keyframe_interval must be >= 1, got {keyframe_interval}")
    if not 0 <= bframes <= 16:
        raise ValueError(f"bframes must be in [0, 16] (x264's limit), got {bframes}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    src, dst = Path(src), Path(dst)
    entries = _entries(src, format, root)
    # Several CPUs per video when few workers run, so that --workers 1 still uses the machine.
    threads = max(1, (os.cpu_count() or 1) // workers)
    rate = Fraction(fps).limit_denominator(1001) if fps is not None else None
    # The umask can only be read by setting it; the files made here get the mode a plain open() would give.
    umask = os.umask(0)
    os.umask(umask)
    jobs: dict[Path, _Job] = {}
    result = PrepareResult()
    for source, relative, _ in entries:
        output = dst / relative
        known = jobs.get(output)
        if known is None:
            jobs[output] = _Job(source, output, short_side, keyframe_interval, bframes, rate, threads, 0o666 & ~umask)
        elif known.source != source:
            result.failed.append((source, f"same output {output} as {known.source}"))
    pending = [job for job in jobs.values() if not job.output.exists()]
    result.skipped = [job.source for job in jobs.values() if job.output.exists()]
    with tqdm(total=len(pending), desc="prepare", unit="video", disable=not progress) as bar:
        for job, error in _run(pending, workers):
            if error is None:
                result.written.append(job.source)
            else:
                result.failed.append((job.source, error))
            bar.update()
    failed = {source for source, _ in result.failed}
    rows = [(output, labels) for source, output, labels in entries if source not in failed and labels is not None]
    result.annotations = _write_lists(dst, rows, result.failed, 0o666 & ~umask)
    return result


def _entries(src: Path, format: str | None, root: str | Path | None) -> list[tuple[Path, Path, str | None]]:
    """``(source, output relative to DST, label text)`` per video; None for a video outside any class folder."""
    dst_relative: list[tuple[Path, Path, str | None]] = []
    if src.is_dir():
        for video in sorted(path for path in src.rglob("*") if path.suffix.lower() in VIDEO_EXTENSIONS):
            if not video.is_file():
                continue
            relative = video.relative_to(src)
            label = relative.parts[0] if len(relative.parts) > 1 else None
            dst_relative.append((video, relative.with_suffix(".mp4"), label))
        if not dst_relative:
            raise FileNotFoundError(f"no video file ({', '.join(VIDEO_EXTENSIONS)}) under {src}")
        return dst_relative
    if not src.is_file():
        raise FileNotFoundError(f"video folder or annotation list not found: {src}")
    format = format or _guess_format(src)
    if format not in ("path_csv", "kinetics_csv"):
        raise ValueError(f"an annotation list to prepare must be path_csv or kinetics_csv, got {format!r}")
    base = Path(root) if root is not None else src.parent
    names = class_names_in(src, format)
    records = read_annotations(src, format, base, len(names) if names else _ANY_INDEX, class_names=names)
    for record in records:
        label = ";".join(names[i] if names else str(i) for i in record.labels)
        dst_relative.append((record.path, _relative_output(record.path, base), label))
    return dst_relative


def _guess_format(src: Path) -> str:
    with open(src, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle, skipinitialspace=True), [])
    return "kinetics_csv" if "youtube_id" in (name.strip().lower() for name in header) else "path_csv"


def _relative_output(video: Path, base: Path) -> Path:
    # A listed video outside the root keeps its whole path under DST, so two such files never collide.
    try:
        relative = video.resolve().relative_to(base.resolve())
    except ValueError:
        relative = Path(*video.resolve().parts[1:])
    return relative.with_suffix(".mp4")


def _run(jobs: Sequence[_Job], workers: int) -> Iterator[tuple[_Job, str | None]]:
    """``(job, error or None)`` as each job ends."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, _encode_job(job)
        return
    # spawn: a forked child would inherit the parent's threads (tqdm's monitor, torch's pools) mid-state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(_encode_job, job): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _encode_job(job: _Job) -> str | None:
    """Encode one video; the error message of an unreadable source, None on success."""
    try:
        with av.open(os.fspath(job.source)) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                return "unknown frame rate"
            frames = container.decode(stream)
            atomic_write(job.output, lambda handle: _encode(frames, handle, Fraction(rate), stream, job))
    except (av.error.FFmpegError, OSError, ValueError, _EmptyVideo) as error:
        return str(error) or type(error).__name__
    return None


class _EmptyVideo(RuntimeError):
    """The source decodes to no frame at all."""


def _encode(
    frames: Iterator[av.VideoFrame],
    handle: io.BufferedIOBase,
    rate: Fraction,
    source: av.video.stream.VideoStream,
    job: _Job,
) -> None:
    width, height = _scaled_size(source.width, source.height, job.short_side)
    out_rate = job.fps or rate
    options = {
        "preset": "medium",
        "crf": "23",
        "x264-params": f"keyint={job.keyframe_interval}:min-keyint={job.keyframe_interval}:scenecut=0"
        f":bframes={job.bframes}:b-pyramid=none:b-adapt=0",
    }
    with av.open(handle, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=out_rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = job.keyframe_interval
        stream.codec_context.thread_count = job.threads
        written = 0
        for index, frame in enumerate(frames):
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            for _ in range(_copies(index, rate, job.fps)):
                # Timestamps are renumbered: the output is constant-rate whatever the source's were.
                scaled.pts, scaled.time_base = written, 1 / out_rate
                # libx264 turns a frame marked I (the source's own key frames, kept by reformat) into a key
                # frame, which would break the fixed interval.
                scaled.pict_type = PictureType.NONE
                container.mux(stream.encode(scaled))
                written += 1
        if written == 0:
            raise _EmptyVideo("no frame could be decoded")
        container.mux(stream.encode(None))
    # mkstemp creates the file owner-only; a prepared data set is read by others like any file made here.
    os.fchmod(handle.fileno(), job.mode)


def _copies(index: int, rate: Fraction, fps: Fraction | None) -> int:
    """How many output frames show input frame ``index`` (on screen over ``[index / rate, (index + 1) / rate)``)."""
    if fps is None:
        return 1
    # Output frame j at time j / fps shows input frame floor(j * rate / fps): the j with
    # index <= j * rate / fps < index + 1.
    return math.ceil((index + 1) * fps / rate) - math.ceil(index * fps / rate)


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Width and height with the short side ``short_side`` and the other side even, like ``scale=-2:S``."""
    if width <= height:
        return short_side, max(2, 2 * round(height * short_side / width / 2))
    return max(2, 2 * round(width * short_side / height / 2)), short_side


def _write_lists(dst: Path, rows: Sequence[tuple[Path, str]], failed: Sequence[tuple[Path, str]], mode: int) -> Path:
    """``prepared.csv`` of the outputs and ``failed.txt`` of this run's failures (empty when none failed)."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows((output.as_posix(), label) for output, label in rows)
    prepared = dst / PREPARED_LIST
    _write_text(prepared, table.getvalue(), mode)
    _write_text(dst / FAILED_LIST, "".join(f"{source}\t{reason}\n" for source, reason in failed), mode)
    return prepared


def _write_text(path: Path, text: str, mode: int) -> None:
    def write(handle: io.BufferedIOBase) -> None:
        handle.write(text.encode("utf-8"))
        os.fchmod(handle.fileno(), mode)

    atomic_write(path, write)
