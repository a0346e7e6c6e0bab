"""What a folder holds, to assert that a command touched nothing on disk."""
from __future__ import annotations

import hashlib
from pathlib import Path


def tree_state(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` (itself included): its mode, and for a file its size,
    modification time and content hash."""
    state = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        key = str(path.relative_to(root))
        if path.is_file():
            state[key] = (info.st_mode, info.st_size, info.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
        else:
            state[key] = (info.st_mode,)
    return state
