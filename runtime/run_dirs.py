"""Run directories no run overwrites: unique fresh ones, a lock per live run, atomic writes.

A directory *holds a run* once it has a config.yaml, summary.json, checkpoints/ or tb/. ``claim`` (rank 0,
after every check that needs no directory) creates the directory, takes its lock (a second live process
is refused; the kernel drops the lock when its holder dies, SIGKILL included) and refuses one that holds
a run unless this process resumes that very run. It also removes the temporary files a kill left behind.
"""
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

from config import ConfigError

LOCK = ".lock"
RUN_DIR_ENV = "PARITYLAB_RUN_DIR"  # the run directory rank 0 chose, passed to the ranks Lightning's DDP launcher starts
RUN_FILES = ("config.yaml", "summary.json", "checkpoints", "tb")
log = logging.getLogger(__name__)


HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
TEMP = re.compile(r"\..+\.(?:(?P<host>[^.-]+)-)?(?P<pid>\d+)-[0-9a-f]{8}\.tmp")  # temp_name's, old ones without host


class StorageError(Exception):
    """A file the project writes could not be written (a full disk, a size limit, a read-only or unwritable
    place): one line naming the file and the reason. Not a ConfigError: the config is fine."""


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def storage_error(err: BaseException, run_dir: Optional[Path] = None) -> Optional[StorageError]:
    """The StorageError behind ``err`` (raised or chained by whatever wrote), or one made from an OSError of a
    failed write in its chain (WRITE_ERRNOS, or a file of ``run_dir`` whose directory was removed under the run);
    None for anything else, which stays a traceback."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, StorageError):
            return err
        if isinstance(err, OSError) and (err.errno in WRITE_ERRNOS or (
                err.errno == errno.ENOENT and run_dir is not None and err.filename is not None
                and Path(os.fsdecode(err.filename)).resolve().is_relative_to(run_dir.resolve()))):
            return StorageError(f"cannot write {os.fsdecode(err.filename or 'a file')}: {err.strerror}")
        err = err.__cause__ or err.__context__
    return None


def temp_name(path: Path) -> Path:
    """A temporary file beside ``path``, named by host and pid so that ``claim`` removes it only once its writer is
    gone (``is_debris``)."""
    return path.with_name(f".{path.name}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, content: Union[str, Callable[[BinaryIO], None]], durable: bool = True) -> None:
    """Write ``content`` (text, or a function writing to a binary file) to a temporary file beside ``path``,
    fsync it, rename it over ``path`` and fsync the directory: a kill at any moment leaves the old file or
    the new one, never a torn one (at worst a temporary file, which ``claim`` removes)."""
    temp = temp_name(path)
    try:
        with open(temp, "xb") as file:
            file.write(content.encode()) if isinstance(content, str) else content(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # on a read-only file system there is nothing to remove
            temp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise StorageError(f"cannot write {path}: {err.strerror or err}") from err
        raise
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def holds_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def make_run_dir(experiment: str, seed: int, root: Path = Path("runs")) -> Path:
    """A new unique run directory root/<experiment>/<time>-<seed>[-<attempt>], created atomically."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = root / experiment / f"{stamp}-{seed}{f'-{attempt}' if attempt else ''}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()  # atomic: two runs never share a directory
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigError(f"run_dir: cannot create {path}: {err.strerror}") from None
    raise ConfigError(f"run_dir: no unique run directory left under {root / experiment}")


def check_place(path: Path) -> None:
    """Refuse a run_dir that cannot be one, before anything is created: a file, under a file, or (for an
    absolute path) in a parent that does not exist. Relative paths get their parents created."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == path else f"is under {parent}, a file"
                raise ConfigError(f"run_dir: {path} {what}")
            break
    if path.is_absolute() and not path.parent.is_dir():
        raise ConfigError(f"run_dir: {path}: its parent directory {path.parent} does not exist")


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting: True, False where another holds it. OSError where this
    file system cannot lock that kind of file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _busy(path: Path, pid_file: str = LOCK, key: str = "run_dir", holder: str = "run") -> ConfigError:
    """The refusal of a directory another process holds, naming the pid it wrote (information only: the lock
    is the directory's)."""
    try:
        pid = (path / pid_file).read_text(errors="replace").strip() or "?"
    except OSError:
        pid = "?"
    return ConfigError(f"{key}: {path} is in use by another live {holder} (pid {pid})")


class RunDirLock:
    """Exclusive hold on a run directory for this process's life (``release`` or exit drops it).

    The flock is taken on the directory itself, which no one can unlink or swap under a live holder (a lock
    file can be removed, and a second process would then lock a new one). Where the file system cannot lock a
    directory (some network file systems), the lock falls back to the file ``pid_file``, which holds the
    holder's pid. sweep.py holds its --out the same way (``key``, ``holder``: how a refusal names them).
    """

    def __init__(self, path: Path, pid_file: str = LOCK, key: str = "run_dir", holder: str = "run"):
        self.path, self.pid_file, self.key = path, pid_file, key
        self.busy = lambda: _busy(path, pid_file, key, holder)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise ConfigError(f"{key}: cannot open {path} ({err.strerror})") from None
        try:
            held = _flock(self.fd)
        except OSError:  # no locks on directories here: lock a file in it instead
            os.close(self.fd)
            self.fd = self._open_lock_file()
            try:
                held = _flock(self.fd)
            except OSError as err:
                log.warning(f"run_dir: {path}: file locks are not supported here ({err.strerror}); "
                            "nothing keeps a second process out")
                held = True
        if not held:
            os.close(self.fd)
            raise self.busy()
        try:
            write_atomic(path / pid_file, f"{os.getpid()}\n", durable=False)
        except StorageError as err:
            self.release()
            raise ConfigError(f"{key}: {path} is not writable ({err.__cause__.strerror})") from None

    def _open_lock_file(self) -> int:
        try:
            return os.open(self.path / self.pid_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"{self.key}: {self.path} is not writable ({err.strerror})") from None

    def release(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(path: Path) -> None:
    """Refuse, before anything is written, a directory that a live run holds (a cheap early look; ``claim``
    takes the lock for good)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        if not _flock(fd):
            raise _busy(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def enclosing_run(path: Path) -> Optional[str]:
    """The run directory that ``path`` would lie inside, if any, with what makes it one (a run's directory holds
    no other run)."""
    for parent in path.resolve().parents:
        found = [name for name in RUN_FILES if (parent / name).exists()]
        if found:
            return f"{parent} (it holds {', '.join(found)})"
    return None


def is_debris(temp: Path) -> bool:
    """Whether ``temp`` is a temporary file (``temp_name``) of a process that is gone: written on this host by a
    pid that no longer runs. A temporary file of a live process, or of another host, is never removed."""
    match = TEMP.fullmatch(temp.name)
    if match is None or match["host"] not in (None, HOST):
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def claim(path: Path, resumes_it: bool) -> RunDirLock:
    """Create and lock ``path`` for this run; refuse one that holds another run (``resumes_it``: this run
    continues the one there). Removes temporary files that a killed run left."""
    check_place(path)
    outer = enclosing_run(path)
    if outer is not None:
        raise ConfigError(f"run_dir: {path} is inside the run directory {outer}; choose a directory outside it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run_dir: cannot create {path}: {err.strerror}") from None
    lock = RunDirLock(path)
    if holds_run(path) and not resumes_it:
        lock.release()
        found = ", ".join(name for name in RUN_FILES if (path / name).exists())
        raise ConfigError(f"run_dir: {path} already holds a run ({found}); resume=auto continues it, "
                          "or choose another run_dir")
    for temp in [*path.glob(".*.tmp"), *path.glob("checkpoints/.*.tmp")]:
        if is_debris(temp):
            temp.unlink(missing_ok=True)
    return lock
