"""Reading the bytes of a small file a user names on the command line (manifest, config, ID list).

Such a file is read once, into memory, and parsed from there: a pipe (``--manifest <(cut ...)`` or
``/dev/stdin``) can only be read once, and parsing it twice (encoding sniff, separator sniff, the table)
left the second reader an empty stream. A named pipe that no process writes to would block ``open``
for ever, so a pipe is opened without blocking and refused when nothing arrives in
:data:`PIPE_WAIT_S` seconds; a device or socket is refused at once.
"""

from __future__ import annotations

import os
import select
import stat
from pathlib import Path

#: seconds a pipe may stay silent before its first byte; a process substitution (``<(cat m.csv)``)
#: writes within milliseconds, a named pipe nobody writes to never does
PIPE_WAIT_S = 5.0


class InputFileError(OSError):
    """A named input cannot be read; the message is one line starting with the path."""


def special_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file (``a named pipe (FIFO)``, ``a socket``, ``a device``,
    ``a directory``), or None for a regular file or a path that does not exist."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def read_input_bytes(path: str | Path, what: str) -> bytes:
    """The whole content of the file or pipe ``path``.

    Args:
        path: a regular file, or a pipe (named or anonymous, e.g. ``/dev/fd/63``).
        what: what the file is (``manifest``, ``config``), for the messages.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputFileError: a directory, device or socket; a pipe silent for :data:`PIPE_WAIT_S` s; a read error.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise InputFileError(f"{path}: cannot read the {what} file ({err.strerror or err})") from None
    if stat.S_ISREG(mode):
        try:
            return path.read_bytes()
        except OSError as err:
            raise InputFileError(f"{path}: cannot read the {what} file ({err.strerror or err})") from None
    if not stat.S_ISFIFO(mode):
        raise InputFileError(f"{path}: {special_file_problem(path)}, not a regular file; the {what} must be a file")
    return _read_pipe(path, what)


def _read_pipe(path: Path, what: str) -> bytes:
    # O_NONBLOCK: opening a named pipe for reading otherwise waits until a writer opens it
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], PIPE_WAIT_S)
        if not ready:
            raise InputFileError(f"{path}: a named pipe (FIFO) that nothing was written to in {PIPE_WAIT_S:g} s; "
                                 f"the {what} must be a file (or a pipe with a writer, e.g. <(cat file))")
        os.set_blocking(fd, True)  # a writer is there: read to its end, however slow
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
