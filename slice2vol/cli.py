"""Command line: ``slice2vol <command> ...``.

Each subcommand lives in ``slice2vol/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import heavy libraries inside
``run`` so that ``slice2vol --help`` stays fast. A module listed here that does not exist yet is
skipped, so jobs can be added one file at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import sys
import warnings
from typing import Any, Iterator, Sequence

from slice2vol import __version__
from slice2vol.commands._common import HelpFormatter

# Order is the order shown in --help.
COMMANDS = (
    "info",
    "synth",
    "encoders",
    "cache",
    "aggregate",
    "finetune",
    "pretrain",
    "embed",
    "export",
    "bench",
    "index",
    "search",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slice2vol",
        description="2D foundation models vs native-3D encoders on brain MRI.",
    )
    parser.add_argument("--version", action="version", version=f"slice2vol {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"slice2vol.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"slice2vol.commands.{name}":
                continue
            raise
        cmd = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                             formatter_class=HelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The sub-parser of command ``name`` inside a parser made by :func:`build_parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise KeyError(f"no command {name!r}")


_OS_REASONS = {
    errno.EEXIST: "already exists (a file where a folder is needed?)",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted (a read-only or immutable file or folder?)",
    errno.EISDIR: "is a folder; a file is needed",
    errno.ENOTDIR: "part of this path is a file, not a folder",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "on a read-only file system",
    errno.ENOENT: "no such file or folder",
}


def os_error_message(err: OSError) -> str:
    """``[Errno 17] File exists: 'runs/x'`` -> ``runs/x: already exists (a file where a folder is needed?)``."""
    where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    return f"{where}: {_OS_REASONS.get(err.errno, err.strerror or str(err))}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's cancel or time limit, ``kill``), raised like Ctrl-C so that the same
    clean-up runs: workers stop, committed parts stay, no temporary file is left."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _catch_sigterm() -> Iterator[None]:
    """Turns SIGTERM into :class:`Terminated` in the main thread while a command runs, unless a handler
    is already set (an embedding program's own): the default action killed the job without a word
    (exit 143), where Ctrl-C printed one line. The default is put back afterwards (``main`` called
    from Python, e.g. a test runner, must not keep the handler)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 1 some subjects failed, 2 usage error)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # overrides may sit between options (`bench --config x a=1 --out y b=2`): argparse gives the
        # positional list the first run only and leaves the rest unrecognised
        sub = command_parser(parser, args.command) if getattr(args, "command", None) else parser
        strays = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if strays:
            sub.error(f"unrecognized arguments: {' '.join(strays)}")
        args.overrides = list(args.overrides) + extra
    # the command line as typed, for the provenance of whatever the job writes
    from slice2vol.commands._common import command_line

    args.command_line = command_line(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # third-party INFO chatter (faiss loader lines) is not ours to print
    for noisy in ("faiss", "faiss.loader", "urllib3", "filelock", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torch's notice to library authors, raised inside MONAI's ViT/MAE/SwinUNETR position grids: the
    # user of a pretrain or embed job can do nothing about it
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    from slice2vol import progress

    progress.set_mode("none" if getattr(args, "no_progress", False) else "auto")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    # a log file that cannot be written (full disk) must not print a traceback per record: the job's
    # own error says what failed (the logging docs' advice for production use)
    logging.raiseExceptions = False
    try:
        from slice2vol.runtime import configure_runtime

        configure_runtime()  # allocator and threads for steady-state CPU work (docs/performance.md)
        with _catch_sigterm():
            return int(args._run(args) or 0)
    except Terminated:
        print("terminated (SIGTERM); what was committed is kept: rerun the command to resume", file=sys.stderr)
        return 143  # 128 + SIGTERM, what the default action gives
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (``slice2vol cache info ... | head -2``): not an error of ours;
        # point stdout at /dev/null so that flushing it at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the broken pipe
    except Exception as err:  # noqa: BLE001
        # User errors (bad input, missing file, our own error classes) get one line, not a traceback;
        # anything else is a bug and keeps its traceback.
        ours = type(err).__module__.startswith("slice2vol")
        if not (ours or isinstance(err, (ValueError, KeyError, FileNotFoundError, OSError))):
            raise
        if args.verbose:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError) and err.filename and not type(err).__module__.startswith("slice2vol"):
            msg = os_error_message(err)
        msg = _name_damaged_store(err, msg, args)
        print(f"slice2vol {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _name_damaged_store(err: BaseException, msg: Any, args: argparse.Namespace) -> Any:
    """An error raised inside h5py names no file (``Can't synchronously read data``): on a command
    given a store, it is that store's HDF5 structure that could not be read or written."""
    import traceback

    store = getattr(args, "store", None) or getattr(args, "sub_store", None)
    if not store or str(store) in str(msg) or _starts_with_a_file(msg):
        return msg
    if not any("h5py" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(err.__traceback__)):
        return msg
    text = " ".join(str(msg).split())[:200]
    return (f"{store}: its HDF5 structure could not be read or written ({text}): the file is damaged; "
            f"`slice2vol cache verify --store {store}` says what is, or rebuild the store with the caching job")


def _starts_with_a_file(msg: Any) -> bool:
    """Whether a message already starts with a file (``PATH: problem``), as this package's errors do."""
    head = str(msg).split(": ", 1)[0]
    return head.endswith((".h5", ".hdf5", ".csv", ".nii", ".nii.gz", ".json", ".npz"))


if __name__ == "__main__":
    sys.exit(main())
