"""The one command-line convention of every ``slice2vol`` job.

Anchor: GNU long options for named inputs, plus Hydra-style ``key=value`` overrides as trailing
positional arguments (dotted keys, list indices, YAML values: ``encoders.0.weights=hub``,
``tasks=[knn,linear]``), applied after ``--config`` and before the job runs (see
:func:`slice2vol.config.load_config`).

One flag name per concept:

==================  ====================================================================
``--config FILE``   YAML config of the job (``configs/...``, or packaged ones by name)
``KEY=VALUE ...``   overrides of that config (positional, last on the line)
``--manifest FILE`` cohort CSV (or BIDS folder where the job accepts one)
``--store FILE``    HDF5 feature store the job reads or writes
``--out PATH``      folder (or file) the job creates; its log file goes there
``--device DEV``    ``auto`` (default: CUDA when available), ``cpu``, ``cuda``, ``cuda:N``
``--no-progress``   no progress output (a bar on a terminal, periodic log lines otherwise)
``--seed N``        random seed
==================  ====================================================================

Jobs with several actions use sub-commands (``slice2vol index build``, ``slice2vol cache merge``).
Every job module calls these helpers instead of declaring its own variants.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in ``--help`` and keeps the line breaks of descriptions and epilogs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # a help text that states its default itself, a flag (False) and an unset option (None) get no
        # second "(default: ...)": "(default: a bar ...) (default: False)" read as two defaults
        text = action.help or ""
        if "(default" in text or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_config(parser: argparse.ArgumentParser, *, required: bool = False, default: str | None = None,
               help: str = "YAML config of this job") -> None:
    parser.add_argument("--config", required=required, default=default, metavar="FILE", help=help)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, Hydra style: dotted keys, list indices, YAML values, "
                             "e.g. splits.n_folds=5 encoders.0.weights=hub tasks=[knn,linear]")


def add_manifest(parser: argparse.ArgumentParser, *, required: bool = False,
                 help: str = "cohort CSV: subject_id, image column(s), labels") -> None:
    parser.add_argument("--manifest", required=required, metavar="FILE", help=help)


def add_store(parser: argparse.ArgumentParser, *, required: bool = True,
              help: str = "HDF5 feature store") -> None:
    parser.add_argument("--store", required=required, metavar="FILE", help=help)


def add_out(parser: argparse.ArgumentParser, *, required: bool = False, default: str | None = None,
            help: str = "output folder") -> None:
    parser.add_argument("--out", required=required, default=default, metavar="PATH", help=help)


def add_device(parser: argparse.ArgumentParser, *, config_key: str | None = None) -> None:
    """``--device``; with ``config_key`` it is unset by default, so the config file's own device (that
    key) stands unless the flag is given (a default of ``auto`` used to override it silently)."""
    if config_key:
        parser.add_argument("--device", default=None, metavar="DEV",
                            help=f"auto (CUDA when available), cpu, cuda or cuda:N (default: the config's "
                                 f"{config_key}, auto)")
    else:
        parser.add_argument("--device", default="auto", metavar="DEV",
                            help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_volume_options(parser: argparse.ArgumentParser) -> None:
    """``--volume KEY=VALUE`` (repeatable): any :class:`~slice2vol.data.io.VolumeConfig` field, e.g. a
    check a refusal names (``--volume max_foreground_fraction=1``); the file-reading rules are otherwise
    fixed for jobs without a config file."""
    parser.add_argument("--volume", action="append", default=[], metavar="KEY=VALUE",
                        help="a VolumeConfig setting, repeatable (e.g. --volume refuse_label_maps=false, "
                             "--volume max_foreground_fraction=1; docs/data.md lists them)")


def volume_config(args: argparse.Namespace, **fixed):
    """The :class:`~slice2vol.data.io.VolumeConfig` of ``fixed`` fields (set by their own flags) and
    ``--volume`` settings; a bad key or value is a ValueError naming ``--volume``."""
    import dataclasses

    import yaml

    from slice2vol.config import load_yaml
    from slice2vol.data.io import VolumeConfig

    known = {f.name for f in dataclasses.fields(VolumeConfig)}
    settings = {}
    for item in getattr(args, "volume", None) or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--volume {item!r}: expected KEY=VALUE, e.g. --volume max_foreground_fraction=1")
        if key not in known:
            raise ValueError(f"--volume {key}: not a VolumeConfig setting; known: {', '.join(sorted(known))}")
        if key in fixed:
            raise ValueError(f"--volume {key}: set it with --{key.replace('_', '-')}")
        # the config files' reader: '1e9' is a number there (PyYAML's safe_load left it a string)
        try:
            settings[key] = load_yaml(text) if text.strip() else None
        except yaml.YAMLError as err:
            where = getattr(err, "problem", None) or "not a YAML value"
            raise ValueError(f"--volume {key}: cannot read {text.strip()!r} ({where})") from None
    try:
        return VolumeConfig(**fixed, **settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--volume: {err}") from None


def weights_arg(text: str) -> str:
    """argparse type of ``--weights``: an empty value (``--weights "$CKPT"`` with the variable unset)
    is refused; it used to mean random weights."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty value (an unset shell variable?): give random, pretrained, "
                                         "hub[:tag], package or a local file")
    return text


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: a bar on a terminal, plain lines every 30 s otherwise)")


#: the largest seed numpy's random states take (``np.random.RandomState``, scikit-learn's ``random_state``)
MAX_SEED = 2**32 - 1


def seed_type(text: str) -> int:
    """argparse type of ``--seed``: a whole number from 0 to 2**32 - 1 (numpy's range); larger or negative
    seeds failed deep inside a job ("Overflow when unpacking long long"), naming no flag."""
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**32 - 1, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1, got {text}")
    return value


def add_seed(parser: argparse.ArgumentParser, default: int | None = 0) -> None:
    parser.add_argument("--seed", type=seed_type, default=default, help="random seed (0 to 2**32 - 1)")


def resolve_device(device: str | None, source: str = "--device") -> str:
    """``auto``/``None`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else checked
    (:func:`slice2vol.runtime.checked_device`; ``source`` names the flag or config key in its message)."""
    from slice2vol.runtime import checked_device

    return checked_device(device, source)


def progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The ``KEY=VALUE`` overrides given on the command line (validated: each has an ``=``)."""
    items = list(getattr(args, "overrides", None) or [])
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"unexpected argument(s) {bad}: overrides are KEY=VALUE (e.g. splits.n_folds=5)")
    return items


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_run_log(out_dir: str | Path, name: str = "slice2vol.log") -> Path:
    """Appends every log record of this process to ``<out_dir>/<name>`` (the run folder's log file).

    Called by each job once its output folder is known; the file handler is added to the root logger
    at INFO level whatever the console level, so a run folder always tells what happened.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / name).resolve()
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return path
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return path


def log_to_run_files(text: str, name: str = "slice2vol") -> None:
    """Writes ``text`` (its lines as one INFO record) to the run-log files of :func:`add_run_log` only.

    For what a job already printed on the console (the summary of a caching job): the log file beside
    the store used to end without it, so a batch job's log said nothing of how many subjects failed.
    """
    record = logging.LogRecord(name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line as typed (for provenance), shell-quoted."""
    import shlex
    import sys

    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(shlex.quote(a) for a in ["slice2vol", *args])
