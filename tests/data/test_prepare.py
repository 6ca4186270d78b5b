"""``prepare_videos`` / ``nlnet data prepare``: real mp4s re-encoded with PyAV, read back with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from nlnet.cli import main
from nlnet.data import read_annotations
from nlnet.data.prepare import prepare_videos


def probe(path: Path) -> tuple[int, int, int, list[int], float]:
    """Width, height, frame count, key-frame positions and average rate of a video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        keys = [index for index, frame in enumerate(frames) if frame.key_frame]
        return frames[0].width, frames[0].height, len(frames), keys, float(stream.average_rate)


@pytest.fixture
def class_tree(tmp_path, make_video):
    """Two class folders of real videos (one portrait, in a subfolder) and a corrupt file among them."""
    src = tmp_path / "src"
    # write_video's content changes colour every frame, so its x264 places scene-cut key frames of its own.
    make_video(src / "cat" / "one.mp4", 40, 48, 64)
    make_video(src / "dog" / "deep" / "two.mp4", 37, 64, 48)
    (src / "dog" / "broken.mp4").write_bytes(b"not a video" * 50)
    return src


def test_folder_prepared_with_key_frames_every_k_and_every_frame(class_tree, tmp_path):
    dst = tmp_path / "dst"
    result = prepare_videos(class_tree, dst, short_side=32, keyframe_interval=8, progress=False)

    assert sorted(path.name for path in result.written) == ["one.mp4", "two.mp4"]
    assert [path.name for path, _ in result.failed] == ["broken.mp4"]
    assert probe(dst / "cat" / "one.mp4") == (42, 32, 40, [0, 8, 16, 24, 32], 25.0)
    assert probe(dst / "dog" / "deep" / "two.mp4") == (32, 42, 37, [0, 8, 16, 24, 32], 25.0)
    assert not (dst / "dog" / "broken.mp4").exists()
    failed = (dst / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(f"{class_tree / 'dog' / 'broken.mp4'}\t")
    # The layout is kept: DST reads as a folder data set (that format looks one level deep), and its list holds
    # every output with its class folder as the label.
    assert [(r.path, r.labels) for r in read_annotations(dst, "folder", dst, 2)] == [(dst / "cat/one.mp4", (0,))]
    by_list = read_annotations(dst / "prepared.csv", "path_csv", dst, 2)
    assert [(r.path, r.labels) for r in by_list] == [(dst / "cat/one.mp4", (0,)), (dst / "dog/deep/two.mp4", (1,))]
    assert (dst / "prepared.csv").read_text() == "path,label\ncat/one.mp4,cat\ndog/deep/two.mp4,dog\n"


def test_fps_resamples_the_frame_count(tmp_path, make_video):
    make_video(tmp_path / "src" / "a" / "clip.mp4", 50, 32, 32, fps=25)
    prepare_videos(tmp_path / "src", tmp_path / "slow", short_side=32, keyframe_interval=4, fps=10, progress=False)
    prepare_videos(tmp_path / "src", tmp_path / "fast", short_side=32, keyframe_interval=4, fps=50, progress=False)

    _, _, frames, keys, rate = probe(tmp_path / "slow" / "a" / "clip.mp4")
    assert (frames, rate, keys) == (20, 10.0, [0, 4, 8, 12, 16])
    _, _, frames, _, rate = probe(tmp_path / "fast" / "a" / "clip.mp4")
    assert (frames, rate) == (100, 50.0)


def test_second_run_skips_every_finished_output(class_tree, tmp_path):
    dst = tmp_path / "dst"
    prepare_videos(class_tree, dst, short_side=32, keyframe_interval=8, progress=False)
    outputs = sorted(dst.rglob("*.mp4"))
    stamps = [path.stat().st_mtime_ns for path in outputs]
    # A temporary file left by a killed run is not a finished output and does not count.
    (dst / "cat" / ".one.mp4.x1y2.tmp").write_bytes(b"torn")

    again = prepare_videos(class_tree, dst, short_side=32, keyframe_interval=8, progress=False)

    assert again.written == [] and sorted(path.name for path in again.skipped) == ["one.mp4", "two.mp4"]
    assert [path.stat().st_mtime_ns for path in sorted(dst.rglob("*.mp4"))] == stamps
    assert [path.name for path, _ in again.failed] == ["broken.mp4"]


def test_annotation_list_labels_carried_over(tmp_path, make_video):
    videos = tmp_path / "videos"
    make_video(videos / "x.mp4", 12, 40, 40)
    make_video(videos / "sub" / "y.mp4", 12, 40, 40)
    (tmp_path / "list.csv").write_text("path,label\nx.mp4,running\nsub/y.mp4,jumping;running\nmissing.mp4,running\n")
    dst = tmp_path / "dst"

    result = prepare_videos(tmp_path / "list.csv", dst, root=videos, short_side=32, keyframe_interval=4, progress=False)

    assert [path.name for path, _ in result.failed] == ["missing.mp4"]
    assert (dst / "prepared.csv").read_text() == "path,label\nx.mp4,running\nsub/y.mp4,jumping;running\n"
    assert probe(dst / "sub" / "y.mp4")[:4] == (32, 32, 12, [0, 4, 8])


def test_kinetics_list_is_recognised(tmp_path, make_video):
    make_video(tmp_path / "abseiling" / "abc_000001_000011.mp4", 8, 32, 32)
    (tmp_path / "k400.csv").write_text("label,youtube_id,time_start,time_end,split\nabseiling,abc,1,11,train\n")

    prepare_videos(tmp_path / "k400.csv", tmp_path / "dst", short_side=32, keyframe_interval=4, progress=False)

    assert (tmp_path / "dst" / "prepared.csv").read_text() == "path,label\nabseiling/abc_000001_000011.mp4,abseiling\n"


@pytest.mark.parametrize(
    "kwargs", [{"short_side": 33}, {"keyframe_interval": 0}, {"bframes": 17}, {"fps": 0}, {"workers": 0}]
)
def test_bad_settings_are_refused(class_tree, tmp_path, kwargs):
    with pytest.raises(ValueError):
        prepare_videos(class_tree, tmp_path / "dst", progress=False, **kwargs)


def test_cli_prints_the_summary_with_parallel_workers(class_tree, tmp_path, capsys):
    dst = tmp_path / "dst"
    argv = ["data", "prepare", str(class_tree), str(dst), "--short-side", "32", "--keyframe-interval", "8"]

    assert main([*argv, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 videos written, 0 already there, 1 failed" in out
    assert str(class_tree / "dog" / "broken.mp4") in out and str(dst / "prepared.csv") in out
    assert probe(dst / "dog" / "deep" / "two.mp4")[3] == [0, 8, 16, 24, 32]

    assert main([*argv, "--fps", "keep"]) == 0
    assert "0 videos written, 2 already there, 1 failed" in capsys.readouterr().out


def test_cli_refuses_a_bad_fps(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", str(tmp_path), str(tmp_path / "dst"), "--fps", "fast"])
    assert exit_info.value.code == 2 and "--fps" in capsys.readouterr().err


def non_reference_frames(path: Path) -> int:
    """Frames no other frame refers to: those PyAV's decoder drops when told to skip non-reference frames."""
    with av.open(str(path)) as container:
        every = sum(1 for _ in container.decode(container.streams.video[0]))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        return every - sum(1 for _ in container.decode(stream))


@pytest.mark.parametrize("bframes", [7, 0])
def test_bframes_makes_the_frames_between_references_skippable(class_tree, tmp_path, bframes):
    dst = tmp_path / "dst"
    prepare_videos(class_tree, dst, short_side=32, keyframe_interval=8, bframes=bframes, progress=False)
    width, height, frames, keys, _ = probe(dst / "cat" / "one.mp4")
    assert (frames, keys) == (40, [0, 8, 16, 24, 32])
    # With 7, a group of 8 is an I frame, 6 B-frames and the P frame that closes it; with 0, all are references.
    assert non_reference_frames(dst / "cat" / "one.mp4") == (30 if bframes else 0)
