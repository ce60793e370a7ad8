"""Writing small files so that readers see the old content or the new, never a partial one."""

from __future__ import annotations

import os


def write_text_atomically(path: str, text: str) -> None:
    """Write `path` through `<path>.tmp-<pid>`, flushed to disk, then renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
