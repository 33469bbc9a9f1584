"""Writing files so that a crash never leaves a half-written one."""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

# `.NAME.PID.tmp` (atomic_write) and `.NAME.PID.part` (downloads).
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.(tmp|part)$")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside `path`; on success, fsync and rename it over `path`.

    On any error the temporary file is removed and `path` is untouched, so a
    previous version of the file survives a crash, a full disk or a Ctrl-C.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path):
    # Makes the rename itself durable; not possible on every platform.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder, *, max_age_s: float = 3600.0) -> list:
    """Delete temporaries that a killed writer left in `folder`; returns their names.

    kill -9 (or a power cut) between open and rename leaves `.NAME.PID.tmp`
    behind: the real file is intact, but the debris would pile up run after
    run. A temporary is stale when the process that named it is gone (POSIX),
    or, where that cannot be asked, when it is older than `max_age_s`. A
    temporary of a live writer is never touched.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _writer_gone(pid, entry, max_age_s):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def _writer_gone(pid: int, entry, max_age_s: float) -> bool:
    if os.name == "posix":
        try:
            os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, owned by someone else
        return False
    # Windows' os.kill(pid, 0) would terminate the process: go by age instead.
    try:
        return time.time() - entry.stat().st_mtime > max_age_s
    except OSError:
        return False
