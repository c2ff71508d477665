"""Durable file replacement: what a file written to a temporary name and renamed into place still needs."""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; Windows has no directory handles to flush).

    A file written to a temporary name, flushed and renamed over the old one survives a power loss only once
    the folder that holds the new name is flushed too."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
