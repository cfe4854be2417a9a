"""Permissions of the files saebench-poly writes: what ``open`` gives a new file under the process's umask (0644
under the usual 022), also for files that a library creates otherwise (safetensors 0.8 writes 0600)."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_permissions() -> int:
    """0666 less the umask: the mode ``open`` gives a new file."""
    return 0o666 & ~current_umask()


def with_new_file_permissions(*paths: Path) -> None:
    """Give each file in ``paths`` (a folder: every file directly in it) the mode of a file ``open`` creates, so that
    weights written by safetensors (0600) are as readable as the ``cfg.json`` beside them."""
    mode = new_file_permissions()
    for path in paths:
        for file in (sorted(path.iterdir()) if path.is_dir() else [path]):
            if file.is_file():
                file.chmod(mode)
