"""Start train.py and eval.py without paying for their imports each time: a server process imports torch and
Lightning once, then forks a child per run, and the child runs the script as ``python script args`` would
(``__main__``, ``sys.argv``, ``sys.path[0]``, its own session, stdout and stderr on the caller's pipes). The
caller gets a Popen-like handle; the server reports the child's exit status. PyTorch's DataLoader forks
workers the same way.

Only runs in the test environment itself use it (conftest.start): a run with an environment of its own, or
one whose point is what a fresh interpreter imports, starts a fresh process."""
import atexit
import contextlib
import gc
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("runtime.training", "runtime.experiment")  # what train.py and eval.py import once they pass their checks


def serve(path: str) -> dict:
    """Accept requests on ``path`` until stdin closes (the test session ended); in each forked child, return
    the request it is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(wake_r, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)
    callers: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in events.select():
            if key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 1024):
                    os._exit(0)  # no teardown: the frozen imports would be reported as leaks
            elif key.fileobj is listener:
                caller, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(caller, 1 << 20, 2)
                pid = os.fork()
                if pid == 0:
                    for sock in (listener, caller, *callers.values()):
                        sock.close()
                    events.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    return {**json.loads(message), "fds": fds}
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):  # a caller that has gone away
                    caller.send(str(pid).encode())
                callers[pid] = caller
            else:
                os.read(wake_r, 4096)
                while callers:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    caller = callers.pop(pid)
                    with contextlib.suppress(OSError):
                        caller.send(str(os.waitstatus_to_exitcode(status)).encode())
                    caller.close()


def run(request: dict) -> None:
    """Become ``python script args`` in ``cwd`` with ``env``, its output on the caller's pipes, and exit as
    Python does, less the teardown of the modules the server imported (a second or so each time)."""
    os.setsid()
    stdout, stderr = request["fds"]
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((devnull, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    # new streams on the new descriptors, made as Python's startup makes them (stderr line-buffered)
    sys.stdin = sys.__stdin__ = open(0, encoding=sys.stdin.encoding, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=sys.stdout.encoding, closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding=sys.stderr.encoding, errors="backslashreplace",
                                       closefd=False, buffering=1)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[0] = str(Path(request["argv"][0]).parent)
    gc.enable()
    try:
        runpy.run_path(request["argv"][0], run_name="__main__")
        code = 0
    except SystemExit as end:
        code = exit_status(end.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code < 0:  # as Python ends on an uncaught KeyboardInterrupt: by the signal itself
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def exit_status(code) -> int:
    """The status ``sys.exit(code)`` ends Python with."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


class Child:
    """The part of subprocess.Popen the tests use, for a child of the server."""

    def __init__(self, server: "Server", args: list[str], cwd: Path, env: dict):
        self.args, self.returncode = args, None
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        self.status = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.status.connect(server.path)
        request = {"argv": args[1:], "cwd": str(cwd), "env": env}
        socket.send_fds(self.status, [json.dumps(request).encode()], [out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        self.pid = int(self.status.recv(64))
        self.stdout, self.stderr = open(out_r, encoding="utf-8"), open(err_r, encoding="utf-8")

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            with contextlib.suppress(BlockingIOError):
                self._ended(self.status.recv(64, socket.MSG_DONTWAIT))
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self.status.settimeout(timeout)
            try:
                self._ended(self.status.recv(64))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _ended(self, status: bytes) -> None:
        self.returncode = int(status)
        self.status.close()

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: Optional[float] = None) -> tuple[str, str]:
        """Both outputs once every writer has closed them (as with Popen, a process the child started may hold
        them open), then the exit status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {self.stdout.fileno(): [], self.stderr.fileno(): []}
        with selectors.DefaultSelector() as events:
            for fd in chunks:
                events.register(fd, selectors.EVENT_READ)
            while events.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in events.select(left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        events.unregister(key.fd)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0.001))
        self.stdout.close()
        self.stderr.close()
        out, err = (b"".join(chunks[f]).decode().replace("\r\n", "\n").replace("\r", "\n") for f in chunks)
        return out, err


class Server:
    """The session's server, started on first use."""

    def __init__(self, env: dict):
        self.dir = tempfile.mkdtemp(prefix="forkserver-")
        self.path = os.path.join(self.dir, "socket")
        atexit.register(shutil.rmtree, self.dir, True)
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def start(self, args: list[str], cwd: Path, env: dict) -> Child:
        return Child(self, args, cwd, env)


if __name__ == "__main__":
    sys.path[0] = str(ROOT)
    for module in PRELOAD:
        __import__(module)
    gc.disable()  # what the imports made stays in pages the children share (gc.freeze's documented use)
    gc.freeze()
    run(serve(sys.argv[1]))
