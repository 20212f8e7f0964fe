"""``slice2vol embed``: one embedding per volume from a native-3D encoder, written into a feature store.

Examples::

    slice2vol embed --encoder 3d/deepbet --weights package --manifest cohort.csv --store feats.h5
    slice2vol embed --encoder 3d/monai_resnet18 --manifest cohort.csv --store feats.h5 \\
        kwargs.levels=[-1] sliding_window.roi_size=[64,64,64]
    slice2vol embed --config my_encoder3d.yaml --manifest cohort.csv --store feats.h5
    slice2vol embed --list                                   # the registered 3D encoders
    slice2vol embed --checkpoint runs/simclr3d/last --manifest cohort.csv --store feats.h5   # an SSL run

The config (``--config`` and ``KEY=VALUE`` overrides) is :class:`slice2vol.encoders3d.Encoder3DConfig`:
``key``, ``weights``, ``kwargs`` (family options), ``sliding_window`` (MONAI sliding-window options, or
null for whole volumes), ``device``. ``--encoder``/``--weights``/``--sliding-window`` are shortcuts for
``key=``, ``weights=`` and ``sliding_window={}``. An interrupted run resumes when run again.

Running again on a store that holds the set updates it (made with the same encoder, weights and
options): subjects whose input files did not change are not embedded again, and the rows of subjects
that fail now or are not in this manifest are kept (listed as "kept from before"). A set of that name
made with other settings is refused unless ``--replace`` is given. The store is checked before any
embedding (locked by another job, not writable: one line, exit 2). A trained SSL checkpoint
(``--checkpoint``, with ``--mode``/``--input-size``/``--overlap``) is embedded and updated the same way
(:class:`slice2vol.ssl.export.CheckpointEncoder3D`).
"""

from __future__ import annotations

import argparse
import sys

from slice2vol.commands._common import (
    add_config,
    add_device,
    add_manifest,
    add_overrides,
    add_progress,
    add_store,
    overrides_of,
    progress_enabled,
    resolve_device,
    weights_arg,
)

HELP = "embed a cohort's volumes with a native-3D encoder (3d/deepbet, MONAI, MedicalNet, ...) into a store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("Examples::", 1)[1].strip("\n") if __doc__ else None
    parser.add_argument("--encoder", metavar="KEY", help="3D encoder key, e.g. 3d/deepbet (see --list)")
    parser.add_argument("--weights", type=weights_arg, help="random | hub[:tag] | package | local checkpoint (default: the config's, "
                                          "else random)")
    parser.add_argument("--list", action="store_true", help="list the registered 3D encoders and exit")
    add_config(parser, help="YAML Encoder3DConfig (key, weights, kwargs, sliding_window, device)")
    add_manifest(parser)
    add_store(parser, required=False, help="HDF5 feature store written (created if needed)")
    parser.add_argument("--name", help="embedding set name (default: the encoder key, or ssl3d/<method>)")
    parser.add_argument("--replace", action="store_true",
                        help="write the set from this run only, dropping the rows of a stored set of that name "
                             "(needed when it was made with another encoder, weights or options)")
    parser.add_argument("--sliding-window", action="store_true",
                        help="tile the volume with MONAI sliding_window_inference (options: sliding_window.*=...)")
    add_device(parser, config_key="device")
    add_progress(parser)
    ssl = parser.add_argument_group("trained SSL checkpoints (slice2vol pretrain)")
    ssl.add_argument("--checkpoint", help="SSL checkpoint directory (RUN/last) instead of a registered encoder")
    ssl.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                     help="whole head in one pass, or mean of sliding training-size windows")
    ssl.add_argument("--input-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                     help="network input (whole; default: the training volume_size) or window (sliding)")
    ssl.add_argument("--overlap", type=float, help="sliding-window overlap, in [0, 1) (default 0.5)")
    ssl.add_argument("--batch-size", type=int, help="windows per pass (sliding; whole: one volume a pass; default 4)")
    add_overrides(parser)


def _list() -> int:
    from slice2vol.encoders3d import ENCODERS3D

    print(f"{'key':28s} {'dim':>5s}  {'weights':24s} source")
    for key in ENCODERS3D.names():
        meta = ENCODERS3D.meta(key)
        print(f"{key:28s} {meta.get('embed_dim', ''):>5}  {'|'.join(meta.get('weights', ())):24s} "
              f"{meta.get('source', '')}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    missing = [flag for flag, value in (("--manifest", args.manifest), ("--store", args.store)) if not value]
    if missing:
        raise ValueError(f"embedding needs {' and '.join(missing)}")
    if args.checkpoint:
        return _run_checkpoint(args)
    from slice2vol.config import load_config
    from slice2vol.data.manifest import load_manifest
    from slice2vol.encoders3d import Encoder3DConfig, embed_cohort3d
    from slice2vol.encoders3d.embed import check_cohort, check_store_writable

    overrides = overrides_of(args)
    if args.encoder:
        overrides.insert(0, f"key={args.encoder}")
    if args.weights:
        overrides.insert(0, f"weights={args.weights}")
    if args.sliding_window:
        overrides.insert(0, "sliding_window={}")
    if args.device is not None:  # given, even as auto: it overrides the config's device
        overrides.append(f"device={args.device}")
    if not args.config and not args.encoder:
        raise ValueError("give --encoder KEY (see slice2vol embed --list) or --config FILE")
    ssl_only = [flag for flag, given in (("--input-size", args.input_size is not None),
                                         ("--mode", args.mode != "whole"), ("--overlap", args.overlap is not None),
                                         ("--batch-size", args.batch_size is not None)) if given]
    if ssl_only:  # they were ignored without a word for registered encoders
        raise ValueError(f"{', '.join(ssl_only)} apply to --checkpoint runs only; a registered encoder takes "
                         "kwargs.input_size=[X,Y,Z] and --sliding-window")
    cfg = load_config(Encoder3DConfig, args.config, overrides)
    name = args.name or cfg.key
    check_store_writable(args.store, name)  # before loading weights and embedding for minutes
    cohort = load_manifest(args.manifest)
    check_cohort(cohort)  # before loading weights
    encoder = cfg.build()
    report = embed_cohort3d(encoder, cohort, args.store, name, progress=progress_enabled(args),
                            sliding_window=cfg.sliding_window, replace=args.replace,
                            provenance={"command": "slice2vol embed", "manifest": str(args.manifest)})
    failures = list(cohort.failures) + list(report.failures)
    print(report.summary(failures=False))
    print(f"  encoder {cfg.key}, weights {encoder.info.weights}"
          + (f" (sha256 {encoder.info.weights_sha256[:16]}...)" if encoder.info.weights_sha256 else ""))
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _run_checkpoint(args: argparse.Namespace) -> int:
    """A trained ``slice2vol pretrain`` checkpoint, embedded like a registered encoder (the set is
    updated on a rerun: only new or changed subjects are embedded; ``--replace`` for other settings)."""
    from slice2vol.data.manifest import load_manifest
    from slice2vol.encoders3d import embed_cohort3d
    from slice2vol.encoders3d.embed import check_store_writable
    from slice2vol.ssl.export import CheckpointEncoder3D, check_options, load_encoder

    if args.encoder or args.config or overrides_of(args):
        raise ValueError("--checkpoint embeds an SSL run; --encoder/--config/KEY=VALUE are for registered encoders")
    if args.sliding_window:
        raise ValueError("--sliding-window is for registered encoders; an SSL checkpoint takes --mode sliding")
    overlap = 0.5 if args.overlap is None else args.overlap
    batch_size = 4 if args.batch_size is None else args.batch_size
    try:  # refused once, before the checkpoint or any volume is read (each used to fail every subject)
        check_options(args.input_size or (1, 1, 1), overlap, batch_size)
    except ValueError as err:  # the message starts with the option's name: input_size, overlap, batch_size
        raise ValueError("--" + str(err).replace("_", "-", 1)) from None
    device = resolve_device(args.device)
    model = load_encoder(args.checkpoint, device)
    meta = model.slice2vol_meta
    cfg = meta["config"]
    if meta["spatial_dims"] != 3:
        raise ValueError(f"{meta['checkpoint']}: a 2D {meta['method']} encoder embeds slices; use "
                         f"slice2vol cache --encoder ssl2d/{meta['method']} --weights {meta['checkpoint']}")
    if args.input_size:
        size = tuple(args.input_size)
    elif args.mode == "sliding":
        size = tuple(cfg["data"]["crop_size"])
    else:
        size = tuple(cfg["data"]["volume_size"] or cfg["data"]["crop_size"])
    name = args.name or f"ssl3d/{meta['method']}"
    check_store_writable(args.store, name)  # before reading a volume
    encoder = CheckpointEncoder3D(model, size, mode=args.mode, overlap=overlap, batch_size=batch_size)
    cohort = load_manifest(args.manifest)
    report = embed_cohort3d(encoder, cohort, args.store, name, progress=progress_enabled(args), replace=args.replace,
                            provenance={"command": "slice2vol embed --checkpoint", "manifest": str(args.manifest),
                                        "checkpoint": meta.get("checkpoint"), "method": meta.get("method"),
                                        "input_size": list(encoder.info.input_size)})
    failures = list(cohort.failures) + list(report.failures)
    print(report.summary(failures=False))
    print(f"  checkpoint {meta.get('checkpoint')} ({meta.get('method')}, step {meta.get('step')}, sha256 "
          f"{str(meta.get('weights_sha256', ''))[:16]}...), {args.mode}, input {tuple(encoder.info.input_size)}")
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if failures else 0
