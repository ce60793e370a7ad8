"""Writing small files so that readers see the old content or the new, never a partial one."""

from __future__ import annotations

import os


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Write `path` through `<path>.tmp-<pid>`, flushed to disk, then renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path: str, text: str) -> None:
    """`write_bytes_atomically` for UTF-8 text."""
    write_bytes_atomically(path, text.encode("utf-8"))
