"""``slice2vol embed``: volume embeddings of a trained 3D SSL encoder, written into a feature store."""

from __future__ import annotations

import argparse

HELP = "embed a cohort's volumes with a trained 3D SSL checkpoint into a feature store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (RUN/last) or run directory")
    parser.add_argument("--manifest", required=True, help="cohort CSV manifest")
    parser.add_argument("--store", required=True, help="feature store .h5 (created if needed)")
    parser.add_argument("--name", help="volume-embedding set name (default: ssl3d/<method>)")
    parser.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                        help="whole head in one pass, or mean of sliding training-size windows")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="network input (whole; default: the training volume_size) or window "
                             "(sliding; default: the training crop_size)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from slice2vol.data.manifest import load_manifest
    from slice2vol.ssl.export import embed_cohort, load_encoder
    from slice2vol.ssl.trainer import resolve_device

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
    cohort = load_manifest(args.manifest)
    report = embed_cohort(model, cohort, args.store, name, input_size=size, mode=args.mode, overlap=args.overlap,
                          batch_size=args.batch_size, device=device, progress=not args.no_progress)
    failures = cohort.failures + report.failures
    print(f"{args.store}: wrote {name!r}, {len(report.done)} subjects x {report.embed_dim} "
          f"({args.mode}, input {size})")
    for f in failures:
        print(f"  failed: {f}")
    return 1 if failures else 0
