"""Run directories no run overwrites: unique fresh ones, a lock per live run, atomic writes.

A directory *holds a run* once it has a config.yaml, summary.json, checkpoints/ or tb/. ``claim`` (rank 0,
after every check that needs no directory) creates the directory, takes its lock (a second live process
is refused; the kernel drops the lock when its holder dies, SIGKILL included) and refuses one that holds
a run unless this process resumes that very run. It also removes the temporary files a kill left behind.
"""
import errno
import fcntl
import logging
import os
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable, Union

from config import ConfigError

LOCK = ".lock"
RUN_DIR_ENV = "PARITYLAB_RUN_DIR"  # the run directory rank 0 chose, passed to the ranks Lightning's DDP launcher starts
RUN_FILES = ("config.yaml", "summary.json", "checkpoints", "tb")
log = logging.getLogger(__name__)


def temp_name(path: Path) -> Path:
    """A temporary file beside ``path`` that ``claim`` recognises as debris if a kill leaves it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, content: Union[str, Callable[[BinaryIO], None]]) -> None:
    """Write ``content`` (text, or a function writing to a binary file) to a temporary file beside ``path``,
    fsync it, rename it over ``path`` and fsync the directory: a kill at any moment leaves the old file or
    the new one, never a torn one (at worst a temporary file, which ``claim`` removes)."""
    temp = temp_name(path)
    try:
        with open(temp, "xb") as file:
            file.write(content.encode()) if isinstance(content, str) else content(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
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


class RunDirLock:
    """Exclusive hold on a run directory for this process's life (``release`` or exit drops it)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"run_dir: {path} is not writable ({err.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.warning(f"run_dir: {path}: file locks are not supported here ({err.strerror}); "
                            "nothing keeps a second process out")
                return
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise ConfigError(f"run_dir: {path} is in use by another live run (pid {owner})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


def check_free(path: Path) -> None:
    """Refuse, before anything is written, a directory that a live run holds (a cheap early look; ``claim``
    takes the lock for good)."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise ConfigError(f"run_dir: {path} is in use by another live run (pid {owner})") from None
    except OSError:
        pass
    finally:
        os.close(fd)


def claim(path: Path, resumes_it: bool) -> RunDirLock:
    """Create and lock ``path`` for this run; refuse one that holds another run (``resumes_it``: this run
    continues the one there). Removes temporary files that a killed run left."""
    check_place(path)
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
    for debris in [*path.glob(".*.tmp"), *path.glob("checkpoints/.*.tmp")]:
        debris.unlink(missing_ok=True)
    return lock
