"""nlnet.utils.io.atomic_write: the target holds the old content or the new, whatever happens to the writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nlnet.utils.io
from nlnet.utils.io import atomic_write

OLD = b"old content\n"
CHUNK = 1 << 20


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_successful_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(OLD)
    atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path, "file.bin") == []


def test_write_creates_the_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.txt"
    atomic_write(target, lambda handle: handle.write("é".encode()))
    assert target.read_text(encoding="utf-8") == "é"


def test_failing_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(OLD)

    def write(handle) -> None:
        handle.write(b"x" * CHUNK)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, write)
    assert target.read_bytes() == OLD
    assert _leftovers(tmp_path, "file.bin") == []


# The child loads nlnet/utils/io.py by path: it needs only the standard library, so the child starts without
# importing torch (through nlnet/__init__.py) and the test stays quick.
_CHILD = textwrap.dedent(
    """
    import importlib.util, sys

    spec = importlib.util.spec_from_file_location("nlnet_io", sys.argv[1])
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    chunks, stop_after = int(sys.argv[3]), int(sys.argv[4])

    def write(handle):
        for index in range(chunks):
            handle.write(bytes([index % 251]) * {chunk})
            if index + 1 == stop_after:
                handle.flush()
                print("mid-write", flush=True)
                sys.stdin.read()  # blocks until the parent kills this process

    io.atomic_write(sys.argv[2], write)
    print("done", flush=True)
    """
).format(chunk=CHUNK)


def _expected_new(chunks: int) -> bytes:
    return b"".join(bytes([index % 251]) * CHUNK for index in range(chunks))


def _start_child(target: Path, chunks: int, stop_after: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, nlnet.utils.io.__file__, str(target), str(chunks), str(stop_after)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_kill_during_a_large_write_leaves_a_complete_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(OLD)
    chunks = 64
    child = _start_child(target, chunks, stop_after=chunks // 2)
    try:
        assert child.stdout.readline().strip() == "mid-write"
        # 32 MiB of the new content are on disk in the temporary file when the process dies without cleanup.
        temporary = _leftovers(tmp_path, "file.bin")
        assert len(temporary) == 1 and (tmp_path / temporary[0]).stat().st_size == (chunks // 2) * CHUNK
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == OLD
    # A SIGKILL leaves no chance to clean up: only a hidden ``.file.bin.*.tmp`` remains beside the intact target.
    (leftover,) = _leftovers(tmp_path, "file.bin")
    assert leftover.startswith(".file.bin.") and leftover.endswith(".tmp")

    # The same write allowed to finish replaces the file with the complete new content.
    finished = _start_child(target, chunks, stop_after=0)
    out, _ = finished.communicate(timeout=120)
    assert finished.returncode == 0 and out.strip() == "done"
    assert target.read_bytes() == _expected_new(chunks)
