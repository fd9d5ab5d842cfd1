"""Test-wide setup (Triton's CPU interpreter, markers, the repository root on sys.path), the subprocess helpers
the end-to-end tests share (train.py runs in sessions of their own, with timeouts, most of them forked from
tests/forkserver.py) and the runs they share (one pytest-xdist worker makes each)."""
import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, TypeVar

import pytest
import torch

import forkserver

ROOT = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():  # Triton runs on a CPU only through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # as train.py (trainer.cpu_threads=1): small tensors, and the early runs use the other core


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without a GPU; under ``pytest -n`` (make test) the users of a shared run form one group,
    so that a single worker makes the run."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        shared = sorted(name for name in item.fixturenames if name in EARLY)
        if shared:
            item.add_marker(pytest.mark.xdist_group("+".join(shared)))


TIMEOUT = 300
K, T = TypeVar("K"), TypeVar("T")


def clean_env() -> dict:
    """This environment without launcher variables (the tests may themselves run under SLURM or torchrun)."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "TORCHELASTIC_", "PARITYLAB_")) and k not in launcher}


SERVED = (str(ROOT / "train.py"), str(ROOT / "eval.py"))
FORK = not torch.cuda.is_available()
SERVER: list[forkserver.Server] = []  # this session's, once a run used it
SERVER_STARTING = threading.Lock()


def unhooked(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(("PARITYLAB_", "PYTEST_"))}


def start(cmd: list[str], cwd: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """A process in a session of its own, so that a timeout can end it with every process it started.
    train.py and eval.py start from the fork server (a fresh interpreter less 3 s of imports) unless their
    environment differs from clean_env() in more than the project's own PARITYLAB_ hooks (read at run time),
    or the machine has a GPU (a process forked after CUDA's driver loaded cannot use it)."""
    base = clean_env()
    if FORK and cmd[0] == sys.executable and cmd[1:2] and cmd[1] in SERVED and (
            env is None or unhooked(env) == unhooked(base)):
        with SERVER_STARTING:  # the early runs' thread may ask at the same time
            if not SERVER:
                SERVER.append(forkserver.Server(base))
        return SERVER[0].start(cmd, cwd, env or base)
    return subprocess.Popen(cmd, cwd=cwd, env=env or base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(*procs: subprocess.Popen, timeout: int = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Wait for each process; past ``timeout``, kill their sessions (Lightning and torchrun start children)."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except BaseException:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        raise
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def train_process(cwd: Path, *args: str, env: Optional[dict] = None) -> subprocess.Popen:
    return start([sys.executable, str(ROOT / "train.py"), *args], cwd, env)


def train(cwd: Path, *args: str, env: Optional[dict] = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return finish(train_process(cwd, *args, env=env), timeout=timeout)[0]


def wait_for(path: Path, proc, timeout: float = 120) -> None:
    """Return once ``path`` exists; fail if ``proc`` ends first (with its stderr) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {path} existed: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def eval_py(*args) -> subprocess.CompletedProcess:
    """eval.py with ``args`` (the run directory first), run from the repository root."""
    return finish(start([sys.executable, str(ROOT / "eval.py"), *map(str, args)], ROOT))[0]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def dead_pid() -> int:
    """The pid of a process that has ended (its writes, if it left any, are debris)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def one_error_line(done: subprocess.CompletedProcess, prefix: str) -> str:
    """The single stderr line of a refused run (exit 2), checked to start with ``error: <prefix>``."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}"), done.stderr[-2000:]
    return lines[0]


def at_once(calls: dict[K, Callable[[], T]], jobs: int = 2) -> dict[K, T]:
    """Each call's result, ``jobs`` calls at a time: independent subprocess runs share the machine's two cores."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def train_all(cwd: Path, runs: dict[K, list[str]], jobs: int = 2,
              envs: Optional[dict[K, dict]] = None) -> dict[K, subprocess.CompletedProcess]:
    """Train.py runs (name -> arguments, and name -> environment where ``envs`` has one), ``jobs`` at a time:
    name -> result."""
    envs = envs or {}
    return at_once({name: functools.partial(train, cwd, *args, env=envs.get(name)) for name, args in runs.items()},
                   jobs)


# --- shared runs, started early ---------------------------------------------------------------------------
# A shared fixture made with ``early`` starts its runs as the session starts, in the background, one run at a
# time beside the tests (the machine's second core), if a collected test uses it. A test that needs it before
# its turn came runs it itself, two runs at a time. Under ``pytest -n`` (make test) the workers keep the cores
# busy instead: nothing runs in the background, and the tests that use one fixture share a worker.
BACKGROUND = ThreadPoolExecutor(max_workers=1)
EARLY: dict[str, Callable[[Path, int], object]] = {}  # fixture name -> its work(directory, jobs)
STARTED: dict[str, Future] = {}


def early(work: Callable[[Path, int], T]):
    """A session fixture named like ``work`` whose value is work(a fresh directory, jobs at a time)."""
    EARLY[work.__name__] = work

    @pytest.fixture(scope="session", name=work.__name__)
    def fixture(tmp_path_factory) -> T:
        future = STARTED.get(work.__name__)
        if future is None or future.cancel():  # not started yet: here and now
            return work(tmp_path_factory.mktemp(work.__name__), 2)
        return future.result()
    return fixture


@pytest.fixture(scope="session", autouse=True)
def start_early(request, tmp_path_factory):
    """Queue the early fixtures the collected tests use, in the order the tests first use them (not under
    ``pytest -n``: there the other workers keep the cores busy)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        yield
        return
    for name in dict.fromkeys(name for item in request.session.items for name in item.fixturenames if name in EARLY):
        STARTED[name] = BACKGROUND.submit(EARLY[name], tmp_path_factory.mktemp(name), 1)
    yield
    BACKGROUND.shutdown(wait=False, cancel_futures=True)


# Every preset, 20 steps with an evaluation and a checkpoint every 10.
PRESET_RUN = ("trainer=cpu", "trainer.progress_bar=false", "trainer.max_steps=20", "eval.every_n_steps=10",
              "checkpoint.every_n_steps=10", "eval.size=64")


@early
def preset_runs(tmp: Path, jobs: int) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Each experiment preset trained once for the session (PRESET_RUN): preset -> (run_dir, train.py's result).
    Copy a run before changing it."""
    from config import CONFIG_DIR
    presets = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    done = train_all(tmp, {p: [f"experiment={p}", f"run_dir={tmp / p}", *PRESET_RUN] for p in presets}, jobs)
    return {p: (tmp / p, done[p]) for p in presets}
