"""Writing small files so that readers see the old content or the new, never a partial one."""

from __future__ import annotations

import os
import tempfile


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


def mkdtemp_like_mkdir(prefix: str, dir: str) -> str:
    """`tempfile.mkdtemp`, but with the permissions `os.mkdir` would give (mkdtemp makes 0700
    folders, and a staged output renamed into place would keep them)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path
