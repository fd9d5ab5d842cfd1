"""Standard streams that never stop a run: characters the terminal cannot encode are escaped, and a reader that
went away (``train.py | head``, a closed ssh session) is ignored, its stream sent to /dev/null from then on.
No torch: train.py guards its streams first."""
import os
import sys
from typing import TextIO


class Guarded:
    """A text stream whose writes cannot raise BrokenPipeError (everything else is the stream's)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so the interpreter's last flush succeeds too
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Make stdout and stderr escape what they cannot encode and survive a closed reader."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, Guarded):
            continue
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
        setattr(sys, name, Guarded(stream))
