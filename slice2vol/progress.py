"""Progress reporting for long jobs: a tqdm bar on a terminal, periodic plain log lines otherwise.

Batch jobs under SLURM or ``nohup`` write to files; a tqdm bar there floods the log with carriage
returns. :func:`track` decides once per loop: when stderr is a terminal it shows a tqdm bar, else it
logs one line every ``every_s`` seconds (and a last one at the end) through :mod:`logging`, so the
lines also reach the run folder's log file.

Example:
    >>> for subject in track(subjects, desc="cache", unit="subj"):
    ...     ...
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

log = logging.getLogger("slice2vol.progress")

#: ``auto`` (bar on a terminal, lines otherwise), ``bar``, ``lines`` or ``none``; the CLI sets it
#: from ``--no-progress``; the environment variable ``SLICE2VOL_PROGRESS`` overrides the default.
_MODE = os.environ.get("SLICE2VOL_PROGRESS", "auto")


def set_mode(mode: str) -> None:
    """Sets the process-wide progress mode (``auto``, ``bar``, ``lines``, ``none``)."""
    global _MODE
    if mode not in ("auto", "bar", "lines", "none"):
        raise ValueError(f"progress mode must be auto, bar, lines or none, got {mode!r}")
    _MODE = mode


def get_mode() -> str:
    """The resolved mode for this process: ``bar``, ``lines`` or ``none``."""
    if _MODE != "auto":
        return _MODE
    try:
        return "bar" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # closed or replaced stderr
        return "lines"


class _Lines:
    """The non-terminal stand-in for a tqdm bar: same ``update``/``set_postfix_str``/``close`` calls."""

    def __init__(self, total: int | None, desc: str, unit: str, every_s: float) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", eta {(self.total - self.n) / rate:.0f} s"
        post = f" [{self.postfix}]" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit} in {elapsed:.0f} s ({rate:.2f} {self.unit}/s{eta}){post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self._line())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:  # noqa: ARG002 - tqdm signature
        self.postfix = text

    def set_description(self, desc: str, refresh: bool = True) -> None:  # noqa: ARG002 - tqdm signature
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n:
                log.info("%s (done)", self._line())

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Null(_Lines):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def bar(total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
        every_s: float = 30.0):
    """A progress object with tqdm's ``update``/``set_postfix_str``/``close``, chosen by :func:`get_mode`."""
    mode = get_mode() if enabled else "none"
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    if mode == "lines":
        return _Lines(total, desc, unit, every_s)
    return _Null(total, desc, unit, every_s)


def track(iterable: Iterable[T], desc: str = "", unit: str = "it", *, total: int | None = None,
          enabled: bool = True, every_s: float = 30.0) -> Iterator[T]:
    """Iterates ``iterable`` while reporting progress (see the module docstring)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    progress = bar(total, desc, unit, enabled=enabled, every_s=every_s)
    try:
        for item in iterable:
            yield item
            progress.update(1)
    finally:
        progress.close()
