"""Stop on SIGTERM, SIGINT or SIGHUP (a closed terminal) at the current SGD step, with a checkpoint there.

``install()`` (train.py, before anything is built) makes these signals set a flag instead of killing the
process or raising KeyboardInterrupt mid-write; a second signal of any of them ends the process at
once (exit 128 + signal; checkpoint writes are atomic, so nothing on disk is torn). The training
loops call ``requested()`` between SGD steps and cut their batch short; ``StopOnSignal`` (runtime/callbacks.py)
then ends fit at that batch's end, every rank at the same step, and train.py saves last.ckpt, says so in one
line and exits 128 + signal without a summary.json. No torch, no Lightning: train.py installs it first.
"""
import os
import signal
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_received: Optional[int] = None


def requested() -> bool:
    """Whether a stop signal has arrived (cheap: the training loops call it every step)."""
    return _received is not None


def received() -> Optional[int]:
    """The signal number that asked this process to stop, or None."""
    return _received


def _handler(signum: int, frame) -> None:
    global _received
    if _received is not None:  # asked twice: stop now
        os._exit(128 + signum)
    _received = signum
    for forward in FORWARD:
        forward(signum)


FORWARD: list = []  # where to pass a signal on: the ranks Lightning's launcher started (StopOnSignal)


def install() -> None:
    """Route SIGTERM, SIGINT and SIGHUP to the stop flag (main thread only, as Python requires)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)
