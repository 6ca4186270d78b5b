"""Soak check: one loader worker decodes thousands of training clips; its resident memory must stay flat.

PyAV decoders have been reported to grow until the process is killed (SlowFast#196). This runs
``nlnet.data.build_loader`` with one persistent worker over small prepared H.264 videos (key frame every 16
frames, so the seek path runs) for ``--clips`` clips, epoch after epoch, and reads the worker's resident set
size less its shared pages (psutil; batches travel through shared memory) after every batch. It reports that
private memory after the first ``--settle`` clips (allocator and library caches warm up first) and the largest
seen after that; the check is that the growth stays under ``--limit-mb``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/soak.py                 # 5,000 clips, growth limit 50 MB
    OMP_NUM_THREADS=1 python benchmarks/soak.py --clips 400
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from nlnet.data import VideoClipDataset, VideoRecord, build_loader
from nlnet.data.prepare import prepare_videos


def write_videos(folder: Path, count: int) -> list[Path]:
    """``count`` 100-frame 160x120 videos of moving noise, re-encoded by ``prepare_videos`` (k = 16)."""
    import av

    source = folder / "source"
    source.mkdir()
    for index in range(count):
        texture = np.random.default_rng(index).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        with av.open(str(source / f"{index}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
            for t in range(100):
                frame = av.VideoFrame.from_ndarray(np.roll(texture, 2 * t, axis=1), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    prepare_videos(source, folder / "prepared", short_side=120, keyframe_interval=16, progress=False)
    return sorted((folder / "prepared").glob("*.mp4"))


def soak(clips: int, settle: int = 200, videos: int = 8, batch_size: int = 10) -> dict[str, float]:
    """Decode ``clips`` 8x8 training clips in one worker; RSS of the worker in MB after ``settle`` clips and after."""
    with tempfile.TemporaryDirectory() as folder:
        paths = write_videos(Path(folder), videos)
        # One corrupt file among them: the error path (a decoder opened and abandoned) is part of the soak.
        broken = Path(folder) / "broken.mp4"
        broken.write_bytes(paths[0].read_bytes()[:2000])
        records = [VideoRecord(path, (0,)) for path in [*paths, broken]] * 25
        dataset = VideoClipDataset(
            records, num_classes=1, num_frames=8, sampling_rate=8, jitter_scales=(120, 150), train_crop=112,
            normalized=False,
        )
        loader = build_loader(dataset, batch_size, shuffle=True, num_workers=1, seed=0, drop_last=False)
        others = {child.pid for child in psutil.Process().children()}  # processes not started by the loader
        worker = None
        seen = skipped = 0
        settled_mb = peak_mb = None
        start = time.perf_counter()
        epoch = 0
        while seen < clips:
            dataset.set_epoch(epoch)
            for batch in loader:
                seen += len(batch["index"])
                skipped += len(batch["skipped"])
                if worker is None:
                    (worker,) = [child for child in psutil.Process().children() if child.pid not in others]
                # Private memory: the resident set less its shared pages (the batches travel through shared
                # memory, whose pages come and go with the batches in flight).
                memory = worker.memory_info()
                rss_mb = (memory.rss - memory.shared) / 2**20
                if settled_mb is None and seen >= settle:
                    settled_mb = peak_mb = rss_mb
                elif settled_mb is not None:
                    peak_mb = max(peak_mb, rss_mb)
                if seen >= clips:
                    break
            epoch += 1
        final_mb = rss_mb
        elapsed = time.perf_counter() - start
        del loader
    return {
        "clips": seen,
        "skipped": skipped,
        "settled_mb": settled_mb,
        "peak_mb": peak_mb,
        "final_mb": final_mb,
        "growth_mb": peak_mb - settled_mb,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=5000, help="clips to decode (default 5000)")
    parser.add_argument("--settle", type=int, default=200, help="clips before the reference RSS (default 200)")
    parser.add_argument("--limit-mb", type=float, default=50.0, help="allowed growth after settling (default 50)")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args = parser.parse_args()
    result = soak(args.clips, args.settle)
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result), encoding="utf-8")
    verdict = "met" if result["growth_mb"] < args.limit_mb else "NOT met"
    print(
        f"worker private RSS {result['settled_mb']:.0f} MB after {args.settle} clips, "
        f"at most {result['peak_mb']:.0f} MB "
        f"over {result['clips']} clips ({result['skipped']} unreadable skipped): growth "
        f"{result['growth_mb']:.1f} MB, target < {args.limit_mb:.0f} MB {verdict}"
    )


if __name__ == "__main__":
    main()
