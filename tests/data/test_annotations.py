"""Annotation readers: the Kinetics CSV, path CSVs, Charades and their errors, with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlnet.data import AnnotationError, VideoRecord, read_annotations


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_kinetics_csv_both_layouts_and_class_indices(tmp_path, make_video):
    flat = make_video(tmp_path / "aaa_000001_000011.mp4", 2, 32, 32)
    nested = make_video(tmp_path / "b class" / "bbb_000010_000020.mp4", 2, 32, 32)
    underscored = make_video(tmp_path / "c_class" / "ccc_000000_000010.mp4", 2, 32, 32)
    csv_path = write(
        tmp_path / "train.csv",
        "label,youtube_id,time_start,time_end,split\n"
        "b class,aaa,1,11,train\n"
        '"b class",bbb,10,20,train\n'
        "\n"
        "c class,ccc,0,10,train\n"
        "a class,ddd,5,15,train\n",
    )
    records = read_annotations(csv_path, "kinetics_csv", tmp_path, 3)
    assert records == [
        VideoRecord(flat, (1,)),
        VideoRecord(nested, (1,)),
        VideoRecord(underscored, (2,)),
        VideoRecord(tmp_path / "ddd_000005_000015.mp4", (0,)),  # missing: skipped later, not here
    ]
    names = ["c class", "b class", "a class"]
    renamed = read_annotations(csv_path, "kinetics_csv", tmp_path, 3, class_names=names)
    assert [r.labels[0] for r in renamed] == [1, 1, 0, 2]


@pytest.mark.parametrize(
    ("fmt", "text", "line", "message"),
    [
        ("kinetics_csv", "label,youtube_id,time_start,time_end\nx,a,1,11\nx,b,one,11\n", 3, "time_start"),
        ("kinetics_csv", "label,youtube_id,time_start,time_end\nx,a,1,11\n\nx,b,1\n", 4, "expected 4"),
        ("kinetics_csv", "label,youtube_id,start,end\nx,a,1,11\n", 1, "lacks the columns"),
        ("path_csv", "path,label\na.mp4,0\nb.mp4\n", 3, "expected 'path,label'"),
        ("path_csv", "a.mp4,0\nb.mp4,5\n", 2, "outside [0, 3)"),
        ("path_csv", "a.mp4,0\nb.mp4,0;;1\n", 2, "empty label"),
        ("charades", "id,actions\nV1,c001 0.0 1.0\nV2,c002 0.0\n", 3, "c<class> <start> <end>"),
    ],
)
def test_malformed_line_raises_annotation_error_with_file_and_line(tmp_path, fmt, text, line, message):
    path = write(tmp_path / "list.csv", text)
    with pytest.raises(AnnotationError) as error:
        read_annotations(path, fmt, tmp_path, 3)
    assert isinstance(error.value, ValueError)
    assert f"list.csv, line {line}" in str(error.value)
    assert message in str(error.value)


def test_unknown_class_name_and_empty_file(tmp_path):
    path = write(tmp_path / "val.csv", "label,youtube_id,time_start,time_end\nseen,a,1,11\nunseen,b,1,11\n")
    with pytest.raises(AnnotationError, match=r"val.csv, line 3: unknown class name 'unseen'"):
        read_annotations(path, "kinetics_csv", tmp_path, 2, class_names=["seen", "other"])
    with pytest.raises(AnnotationError, match="no video"):
        read_annotations(write(tmp_path / "empty.csv", "path,label\n"), "path_csv", tmp_path, 2)
    with pytest.raises(FileNotFoundError):
        read_annotations(tmp_path / "nope.csv", "path_csv", tmp_path, 2)
    with pytest.raises(ValueError, match="format"):
        read_annotations(path, "kinetics", tmp_path, 2)


def test_path_csv_names_indices_and_multi_labels(tmp_path):
    path = write(tmp_path / "list.csv", "path,label\nx/a.mp4,2\n/abs/b.mp4,1;0\n")
    records = read_annotations(path, "path_csv", tmp_path, 3)
    assert records == [VideoRecord(tmp_path / "x/a.mp4", (2,)), VideoRecord(Path("/abs/b.mp4"), (1, 0))]
    named = write(tmp_path / "named.csv", "a.mp4,dog\nb.mp4,cat\n")
    assert [r.labels for r in read_annotations(named, "path_csv", tmp_path, 2)] == [(1,), (0,)]
