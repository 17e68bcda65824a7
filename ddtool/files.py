"""Output files written atomically, and checks on the paths a user hands in.

Every file ddtool writes goes through :class:`Outputs` (or :func:`atomic_output`, one file): the
content is written to a private staging folder beside the destination and moved over the
destination with ``os.replace`` only once every file of the set is complete (and, for exports,
verified). A crash, a full disk or a failed check half-way leaves no partial file and the
previous output intact; staged files keep their final names, so a set whose members refer to
each other (an ONNX graph and its external data) is checked where it will be used.

Three rules hold for every output, whatever ``--force`` says:

* **no output is an input**: a path that resolves (through symlinks, ``..`` and hard links) to
  a file the run reads, or into a folder it reads, is refused (:func:`protect_inputs`);
* **the disk may fill up**: libraries that abort the process on a full disk (TorchScript and
  torch.export writers) or raise something other than ``OSError`` (``torch.save``) serialize
  into memory first (:func:`to_bytes`), and only plain Python writes touch the disk;
* **the umask applies**: files are created with mode 0666 minus the umask, as other tools do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError

#: Staging folders are named ``.ddtool-<pid>-<random>.tmp``; the pid tells a dead writer's.
STAGE_PREFIX = ".ddtool-"
STAGE_SUFFIX = ".tmp"
#: The lock file of a folder being written by a run (``distill --out``).
LOCK_NAME = ".ddtool.lock"

# (real path, device and inode if it exists, whether it is a folder) of every input of the run
_inputs: list[tuple[str, tuple[int, int] | None, bool]] = []


# --------------------------------------------------------------------------- inputs are never outputs
def protect_inputs(*paths: str | os.PathLike | None) -> None:
    """Declare the files and folders this run reads (``None`` entries are ignored); every later
    output check refuses a path that is one of them or lies inside one of the folders. Replaces
    any earlier declaration; :func:`release_inputs` forgets them."""
    _inputs.clear()
    for path in paths:
        if path is None:
            continue
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
            _inputs.append((real, (st.st_dev, st.st_ino), os.path.isdir(real)))
        except OSError:
            _inputs.append((real, None, False))


def release_inputs() -> None:
    """Forget the inputs declared by :func:`protect_inputs`."""
    _inputs.clear()


@contextlib.contextmanager
def protected_inputs(*paths: str | os.PathLike | None) -> Iterator[None]:
    """:func:`protect_inputs` for the length of the block (a run), then :func:`release_inputs`."""
    protect_inputs(*paths)
    try:
        yield
    finally:
        release_inputs()


def inside(child: str, folder: str) -> bool:
    """Whether the real path ``child`` is ``folder`` or lies in it."""
    return child == folder or child.startswith(folder.rstrip(os.sep) + os.sep)


def _input_hit(path: Path, as_folder: bool = False) -> str | None:
    """The input that ``path`` resolves to or lies in (or, for an output folder, that lies in it)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        ident = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    for inp, inp_ident, is_dir in _inputs:
        if real == inp or (ident is not None and ident == inp_ident) or (is_dir and inside(real, inp)):
            return inp
        if as_folder and inside(inp, real):
            return inp
    return None


def check_not_input(path: str | os.PathLike, as_folder: bool = False) -> None:
    """Refuse an output that resolves to an input (see :func:`protect_inputs`); for an output
    folder, also one that holds an input."""
    hit = _input_hit(Path(path), as_folder)
    if hit is not None:
        what = "output folder" if as_folder else "output"
        raise OutputError(f"{what} {path} would overwrite or write into the input {hit}; "
                          "choose another output path (--force never replaces an input)")


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output that is an input, that exists without ``force``, or whose folder cannot
    be written.

    Nothing is created here: a missing folder is made only when something is written into it,
    so a run that fails early leaves no trace.
    """
    path = Path(path)
    check_not_input(path)
    try:
        if len(os.fsencode(path.name)) > _name_max(path):
            raise OutputError(f"output name {path.name[:40]}... is longer than the file system allows")
        if path.is_dir():
            raise OutputError(f"output {path} is a folder; give a file name")
        if path.exists() and not force:
            raise OutputError(f"output {path} already exists; pass --force to replace it")
        existing = _existing(path.parent)
    except OSError as err:
        raise OutputError(f"cannot use output {path}: {err.strerror or err}") from None
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {path.parent}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {existing} is not writable")
    return path


def check_output_folder(folder: str | os.PathLike) -> Path:
    """An output folder (``distill --out``): not an input, not inside one, holding none."""
    folder = Path(folder)
    check_not_input(folder, as_folder=True)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file")
    return folder


def _name_max(path: Path) -> int:
    try:
        return os.pathconf(_existing(path.parent), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, outermost first."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    made: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.append(path)
    except OSError as err:
        remove_if_empty(made)
        raise OutputError(f"cannot create output folder {folder}: {err.strerror or err}") from None
    return made


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the ``folders`` (outermost first) that are empty, innermost first: never what holds files."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


# --------------------------------------------------------------------------- staged writes
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder: Path) -> None:
    """Delete the staging folders of earlier writes into ``folder`` whose process is gone (a
    SIGKILL or a power cut half-way through a write leaves one behind)."""
    try:
        entries = list(folder.glob(f"{STAGE_PREFIX}*{STAGE_SUFFIX}"))
    except OSError:
        return
    for stage in entries:
        pid = stage.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and stage.is_dir() and not stage.is_symlink():
            shutil.rmtree(stage, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (mode 0666 minus the umask) and flush it to the disk, so that
    a full disk shows here as ``OSError`` and not later."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror(err: OSError, path: Path) -> OutputError:
    return OutputError(f"could not write {path}: {err.strerror or err}")


class Outputs:
    """A set of output files written as one.

    ``path(dest)`` gives the staged path of ``dest`` (same name, in a private folder beside
    it) for a library that writes by name; ``write(dest, data)`` stages bytes. ``commit()``
    moves every staged file onto its destination; ``discard()`` (or an exception in the
    ``with`` block) removes them, and any folder this set created, leaving the previous
    outputs as they were.
    """

    def __init__(self, force: bool = False):
        self.force = force
        self.staged: dict[Path, Path] = {}  # destination -> staged path
        self._stages: dict[Path, Path] = {}  # destination folder -> staging folder
        self._created: list[Path] = []  # folders made for the outputs, outermost first

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        target = next(iter(self.staged), None) or Path(getattr(exc, "filename", None) or "output")
        self.discard()
        if isinstance(exc, OSError):  # a writer's own file I/O failed (a full disk, say)
            raise _oserror(exc, target) from None

    def _stage_folder(self, folder: Path) -> Path:
        if folder not in self._stages:
            self._created += make_folders(folder)
            remove_stale_staging(folder)
            try:
                self._stages[folder] = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-",
                                                             suffix=STAGE_SUFFIX, dir=folder))
            except OSError as err:
                raise _oserror(err, folder) from None
        return self._stages[folder]

    def path(self, dest: str | os.PathLike) -> Path:
        """The staged path for ``dest`` (checked as an output first)."""
        dest = check_output(dest, self.force)
        key = Path(os.path.abspath(dest))
        if key in self.staged:
            return self.staged[key]
        staged = self._stage_folder(key.parent) / key.name
        self.staged[key] = staged
        return staged

    def write(self, dest: str | os.PathLike, data: bytes) -> Path:
        staged = self.path(dest)
        try:
            _write_file(staged, data)
        except OSError as err:
            self.discard()
            raise _oserror(err, Path(dest)) from None
        return staged

    def commit(self) -> None:
        try:
            for dest, staged in self.staged.items():
                if staged.exists():
                    check_not_input(dest)  # once more: an input may have appeared meanwhile
                    os.replace(staged, dest)
        except OSError as err:
            self.discard()
            raise _oserror(err, dest) from None
        finally:
            for stage in self._stages.values():
                shutil.rmtree(stage, ignore_errors=True)
        self.staged.clear()
        self._stages.clear()
        self._created.clear()

    def discard(self) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        remove_if_empty(self._created)
        self.staged.clear()
        self._stages.clear()
        self._created.clear()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a staged path for ``path``; move it onto ``path`` if the block succeeds.

    On any exception the staged file is removed and ``path`` is left as it was. Writers that
    may abort the process or raise non-``OSError`` errors on a full disk must not write here
    directly: use :func:`write_bytes` with :func:`to_bytes`.
    """
    outputs = Outputs(force)
    try:
        staged = outputs.path(path)
        yield staged
        outputs.commit()
    except OSError as err:
        outputs.discard()
        raise _oserror(err, Path(path)) from None
    except BaseException:
        outputs.discard()
        raise


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with Outputs(force) as outputs:
        outputs.write(path, data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8", "surrogateescape"), force)


def to_bytes(save: Callable[[io.BytesIO], object]) -> bytes:
    """What ``save(buffer)`` writes, serialized in memory (``torch.save``, ``torch.jit.save``,
    ``torch.export.save`` and ``savefig`` all take a file object)."""
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- one run per folder
def _try_flock(fd: int, path: Path) -> OSError | None:
    """Take the exclusive lock without waiting; the error if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:  # a finishing run removed the file meanwhile
            return BlockingIOError(errno.EWOULDBLOCK, "lock file replaced")
    except OSError as err:
        return err
    return None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on an output folder for the length of a run.

    The lock is ``flock`` on ``FOLDER/.ddtool.lock`` (which records the holder's pid): the
    kernel drops it when its process dies, however it dies, so a stale file from a killed run
    never blocks the next one. A second run on the same folder refuses at once. The folder and
    the lock file are removed afterwards if the run leaves nothing else in the folder.
    """
    folder = Path(folder)
    created = make_folders(folder)
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        remove_if_empty(created)
        raise OutputError(f"cannot use output folder {folder}: {err.strerror or err}") from None
    problem = _try_flock(fd, folder / LOCK_NAME)
    if problem is not None and problem.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
        problem = None  # a file system without locks: run unlocked rather than not at all
    if problem is not None:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if problem.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.ENOENT):
            raise OutputError(f"output folder {folder} is in use by another ddtool run (pid {holder}); "
                              "wait for it or choose another --out")
        raise OutputError(f"cannot lock output folder {folder}: {problem.strerror or problem}")
    try:
        with contextlib.suppress(OSError):  # the pid is for the message of a refused run; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink()
        os.close(fd)
        remove_if_empty(created)


# --------------------------------------------------------------------------- small helpers
def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_safe(obj):
    """``obj`` with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def display_path(path: str | os.PathLike) -> str:
    """A path as text that any terminal, CSV or JSON file takes: bytes that are not UTF-8 (a
    file name from another system) are shown as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (following symlinks); False for FIFOs, devices, sockets, folders,
    and paths that cannot be looked at. Opening a FIFO would block forever."""
    try:
        import stat

        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
