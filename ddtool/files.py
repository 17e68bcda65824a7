"""Output files written atomically, and checks on the paths a user hands in.

Every file ddtool writes goes through :func:`atomic_output`: the content is written to a temporary
file in the destination folder and moved over the destination with ``os.replace`` only once it is
complete (and, for exports, verified). A crash or a full disk half-way leaves no partial file and
the previous output intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output without ``force`` and an output folder that cannot be written.

    Nothing is created here: a missing folder is made only when something is written into it,
    so a run that fails early leaves no trace.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists; pass --force to replace it")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {path.parent}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {existing} is not writable")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of earlier writes to ``path`` whose process is gone (a
    SIGKILL or a power cut half-way through a write leaves one behind)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was. The
    temporary name carries the writer's pid, so a later write can tell a stale one.
    """
    path = check_output(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {path.parent}: {err.strerror or err}") from None
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"could not write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path, force) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
