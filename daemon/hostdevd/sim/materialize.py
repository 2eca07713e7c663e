"""The simulated kernel written out as a real directory tree, for :class:`~hostdevd.core.sysfs.RealHost`
to read as it reads /sys (the RealHost tests and bench/scale.py's start-up benchmarks)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from .simkernel import SimKernel


def write_sys_tree(k: SimKernel, sys_root: Path) -> None:
    """The simulated /sys under sys_root (which must not exist): directories, files, symlinks."""

    def walk(rel: str) -> None:
        for name in k.listdir(rel):
            child = f"{rel}/{name}" if rel else name
            target = sys_root / child
            try:
                os.symlink(k.readlink(child), target)
                continue
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            try:
                k.listdir(child)
            except NotADirectoryError:
                try:
                    target.write_bytes(k.read_bytes(child, 1 << 16))
                except PermissionError:
                    target.write_bytes(b"")          # write-only attribute
                continue
            target.mkdir()
            walk(child)

    sys_root.mkdir(parents=True)
    walk("")
