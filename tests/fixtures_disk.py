"""A real size-limited filesystem (tmpfs with size=) for full-disk tests (root only)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(mnt: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the filesystem; unlink it to give the space back."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        left = st.f_bavail * st.f_frsize - leave
        chunk = b"\0" * (1 << 20)
        while left > 0:
            left -= f.write(chunk[:min(left, len(chunk))])
    return filler
