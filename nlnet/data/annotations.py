"""Annotation files to video records: the Kinetics CSV, ``path,label`` CSVs, Charades and class folders.

Formats (``read_annotations``):

- ``kinetics_csv``: the official Kinetics CSV with a header and the columns ``label, youtube_id, time_start,
  time_end`` (others, such as ``split``, are ignored). The label is a class name. The video is
  ``root/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` or, if that file does not exist,
  ``root/<label>/<same name>`` (also tried with spaces in the label replaced by ``_``), the two layouts of
  common Kinetics dumps.
- ``path_csv``: rows ``path,label`` with an optional ``path,label`` header; ``path`` is relative to ``root``
  unless absolute; ``label`` is a class index or a class name, several labels separated by ``;``.
- ``charades``: the Charades CSV (header with at least ``id`` and ``actions``); ``actions`` looks like
  ``c092 11.90 21.20;c147 0.00 12.60`` and gives the video-level labels 92 and 147 (segment times are not
  used); a video without actions gets no label. The video is ``root/<id>.mp4``.
- ``folder``: ``<dir>/<class name>/<video file>``; ``nlnet.data.build_dataset`` uses ``root/<split>`` when
  ``root`` has split folders (``train``, ``val``, ``test``) and ``root`` itself otherwise (then every split
  holds the same videos).

Class names map to indices through ``class_names`` when given, else through the sorted names found in the
annotations.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "ANNOTATION_FORMATS",
    "AnnotationError",
    "VideoRecord",
    "class_names_in",
    "kinetics400_class_names",
    "read_annotations",
]

ANNOTATION_FORMATS = ("kinetics_csv", "path_csv", "folder", "charades")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
# Index order of the official Kinetics-400 models: the label names sorted, as in video-nonlocal-net's
# process_data/kinetics/classids.json ("abseiling" 0 ... "zumba" 399).
_KINETICS400_FILE = "kinetics400_classes.txt"
_CHARADES_ACTION = re.compile(r"c(\d+)\s+\d+(?:\.\d*)?\s+\d+(?:\.\d*)?")


class AnnotationError(ValueError):
    """A line of an annotation file cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class VideoRecord:
    """One annotated video: its file and its class indices (one for single-label data)."""

    path: Path
    labels: tuple[int, ...]


@dataclass(frozen=True)
class _Row:
    line: int
    path: Path
    labels: tuple[int | str, ...]


def read_annotations(
    path: str | Path | None,
    format: str,
    root: str | Path,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
) -> list[VideoRecord]:
    """Read an annotation file (or a class-folder tree) into video records.

    Args:
        path: the annotation file; for ``folder``, the directory of class folders (``None``: ``root``).
        format: one of ``kinetics_csv``, ``path_csv``, ``folder``, ``charades`` (see the module docstring).
        root: directory the video paths are relative to.
        num_classes: number of classes; every label must be below it.
        class_names: names of the classes in index order; when omitted, class names found in the file (or
            the folder names) are sorted to give the indices.

    Returns:
        the records in file order (folders: sorted by class, then file name).

    Raises:
        AnnotationError: a malformed line (message names the file and the 1-based line number), an unknown
            class name or an out-of-range label, or no video at all.
        FileNotFoundError: the annotation file or folder does not exist.
    """
    if format not in ANNOTATION_FORMATS:
        raise ValueError(f"format must be one of {ANNOTATION_FORMATS}, got {format!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    root = Path(root)
    source = Path(path) if path is not None else root
    if format == "folder":
        if not source.is_dir():
            raise FileNotFoundError(f"video folder not found: {source}")
        rows = _folder_rows(source)
    else:
        if not source.is_file():
            raise FileNotFoundError(f"annotation file not found: {source}")
        rows = {"kinetics_csv": _kinetics_rows, "path_csv": _path_csv_rows, "charades": _charades_rows}[format](
            source, root
        )
    if not rows:
        raise AnnotationError(f"{source}: no video listed")
    if class_names is None:
        found = sorted({label for row in rows for label in row.labels if isinstance(label, str)})
        class_names = found or None
    index_of = {name: i for i, name in enumerate(class_names or [])}
    records = []
    for row in rows:
        labels = []
        for label in row.labels:
            if isinstance(label, str):
                if label not in index_of:
                    raise AnnotationError(f"{_where(source, row)}: unknown class name {label!r}")
                label = index_of[label]
            if not 0 <= label < num_classes:
                raise AnnotationError(
                    f"{_where(source, row)}: label {label} is outside [0, {num_classes}) (num_classes)"
                )
            labels.append(label)
        records.append(VideoRecord(row.path, tuple(labels)))
    return records


def _where(source: Path, row: _Row) -> str:
    return f"{source}, line {row.line}" if row.line else str(row.path)


def class_names_in(path: str | Path, format: str) -> list[str] | None:
    """Sorted class names used by an annotation file or class-folder tree; ``None`` if labels are indices.

    Args:
        path: the annotation file, or the directory of class folders for ``folder``.
        format: one of ``kinetics_csv``, ``path_csv``, ``folder``, ``charades``.
    """
    if format not in ANNOTATION_FORMATS:
        raise ValueError(f"format must be one of {ANNOTATION_FORMATS}, got {format!r}")
    if format == "charades":
        return None
    if format == "folder":
        rows = _folder_rows(Path(path))
    else:
        reader = _kinetics_rows if format == "kinetics_csv" else _path_csv_rows
        rows = reader(Path(path), Path("."))
    names = sorted({label for row in rows for label in row.labels if isinstance(label, str)})
    return names or None


def _csv_lines(source: Path) -> Iterator[tuple[int, list[str]]]:
    """Non-blank CSV rows with the physical line number where each starts."""
    with open(source, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, skipinitialspace=True)
        line = 1
        for fields in reader:
            start, line = line, reader.line_num + 1
            if any(field.strip() for field in fields):
                yield start, [field.strip() for field in fields]


def _csv_header(source: Path, lines: Iterator[tuple[int, list[str]]], required: Sequence[str]) -> dict[str, int]:
    first = next(lines, None)
    if first is None:
        raise AnnotationError(f"{source}: empty file, expected a header with columns {list(required)}")
    line, header = first
    columns = {name.lower(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in columns]
    if missing:
        raise AnnotationError(f"{source}, line {line}: header {header} lacks the columns {missing}")
    return columns


def _field(source: Path, line: int, fields: list[str], columns: dict[str, int], name: str) -> str:
    if len(fields) != len(columns):
        raise AnnotationError(
            f"{source}, line {line}: expected {len(columns)} comma-separated fields like the header, "
            f"got {len(fields)}: {fields}"
        )
    return fields[columns[name]]


def _kinetics_rows(source: Path, root: Path) -> list[_Row]:
    lines = _csv_lines(source)
    columns = _csv_header(source, lines, ("label", "youtube_id", "time_start", "time_end"))
    rows = []
    for line, fields in lines:
        label = _field(source, line, fields, columns, "label")
        youtube_id = _field(source, line, fields, columns, "youtube_id")
        times = []
        for name in ("time_start", "time_end"):
            text = fields[columns[name]]
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not value.is_integer() or value < 0:
                raise AnnotationError(f"{source}, line {line}: {name} must be a whole number of seconds, got {text!r}")
            times.append(int(value))
        if not label or not youtube_id:
            raise AnnotationError(f"{source}, line {line}: empty label or youtube_id in {fields}")
        name = f"{youtube_id}_{times[0]:06d}_{times[1]:06d}.mp4"
        candidates = [root / name, root / label / name, root / label.replace(" ", "_") / name]
        video = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
        rows.append(_Row(line, video, (label,)))
    return rows


def _path_csv_rows(source: Path, root: Path) -> list[_Row]:
    rows = []
    for position, (line, fields) in enumerate(_csv_lines(source)):
        if position == 0 and [field.lower() for field in fields] == ["path", "label"]:
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise AnnotationError(f"{source}, line {line}: expected 'path,label', got {fields}")
        labels = []
        for token in fields[1].split(";"):
            token = token.strip()
            if not token:
                raise AnnotationError(f"{source}, line {line}: empty label in {fields[1]!r}")
            labels.append(int(token) if re.fullmatch(r"[+-]?\d+", token) else token)
        video = Path(fields[0])
        rows.append(_Row(line, video if video.is_absolute() else root / video, tuple(labels)))
    return rows


def _charades_rows(source: Path, root: Path) -> list[_Row]:
    lines = _csv_lines(source)
    columns = _csv_header(source, lines, ("id", "actions"))
    rows = []
    for line, fields in lines:
        video_id = _field(source, line, fields, columns, "id")
        actions = fields[columns["actions"]]
        if not video_id:
            raise AnnotationError(f"{source}, line {line}: empty id")
        labels: list[int] = []
        for action in filter(None, (part.strip() for part in actions.split(";"))):
            match = _CHARADES_ACTION.fullmatch(action)
            if match is None:
                raise AnnotationError(
                    f"{source}, line {line}: action {action!r} is not 'c<class> <start> <end>', e.g. 'c092 11.90 21.20'"
                )
            labels.append(int(match.group(1)))
        rows.append(_Row(line, root / f"{video_id}.mp4", tuple(sorted(set(labels)))))
    return rows


def _folder_rows(directory: Path) -> list[_Row]:
    if not directory.is_dir():
        raise FileNotFoundError(f"video folder not found: {directory}")
    rows = []
    for class_dir in sorted(entry for entry in directory.iterdir() if entry.is_dir()):
        for video in sorted(class_dir.iterdir()):
            if video.is_file() and video.suffix.lower() in VIDEO_EXTENSIONS:
                rows.append(_Row(0, video, (class_dir.name,)))
    return rows


def kinetics400_class_names() -> list[str]:
    """The 400 Kinetics class names in the index order of the official models (package data, one a line)."""
    text = (resources.files("nlnet.data") / _KINETICS400_FILE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]
