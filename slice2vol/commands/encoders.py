"""``slice2vol encoders``: list the 2D encoders with their sizes, preprocessing and dense feature levels.

The default listing reads registry metadata only (fast, no model built, no weights touched);
``--details`` builds each selected encoder with random weights to report the resolved preprocessing,
the token grid, the dense feature levels (name:channels@stride) and the exact parameter count.
Keys outside the presets (open registry: any ``timm/<name>``, ``openclip/<arch>:<tag>``,
``hf/<repo_id>``) are built when named exactly, e.g. ``slice2vol encoders --details timm/convnext_atto``.

Examples::

    slice2vol encoders                              # every preset key
    slice2vol encoders 'timm/vit*' --details        # resolved preprocessing of the timm ViTs
    slice2vol encoders tv/mobilenet_v2 --details --weights pretrained --json --out mnv2.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slice2vol.commands._common import add_device, add_out, add_progress, progress_enabled, resolve_device, weights_arg

HELP = "list the 2D encoders (keys, embedding size, input size, parameters, dense levels)"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*",
                        help="glob on preset keys (e.g. 'timm/vit*'), or one exact open-registry key")
    parser.add_argument("--details", action="store_true",
                        help="build each encoder and show resolved preprocessing, token grid and feature levels")
    parser.add_argument("--weights", type=weights_arg, default="random", metavar="WEIGHTS",
                        help="weights for --details: random | pretrained | imagenet | package | hub[:tag] | FILE")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    add_out(parser, help="also write the rows to this file (.jsonl, or .csv)")
    add_device(parser)
    add_progress(parser)


def _row_from_meta(key: str, meta: dict) -> dict:
    return {"key": key, "family": meta.get("family", ""), "embed_dim": meta.get("embed_dim", ""),
            "input": meta.get("input_size", ""), "params_M": meta.get("params_m", ""),
            "img_size": meta.get("img_size", ""), "pretrained": meta.get("pretrained", "")}


def _row_from_build(key: str, weights: str, device: str) -> dict:
    import torch

    from slice2vol.encoders import build_encoder

    encoder = build_encoder(key, weights).to(device)
    info = encoder.info
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    with torch.inference_mode():
        tokens, grid = encoder.tokens(torch.zeros(1, 1, *info.input_size, device=device))
    levels = encoder.feature_info()
    return {"key": key, "family": info.source, "embed_dim": info.embed_dim,
            "input": "x".join(map(str, info.input_size)), "params_M": round(params, 2),
            "tokens": f"{grid[0]}x{grid[1]}x{tokens.shape[-1]}", "pooling": info.pooling,
            "resize": info.resize + (f" {info.resize_size} (crop_pct {info.crop_pct:.3f})"
                                     if info.resize == "shorter" else ""),
            "interp": info.interpolation, "mean": ",".join(f"{v:.3f}" for v in info.mean),
            "std": ",".join(f"{v:.3f}" for v in info.std),
            "levels": " ".join(f"{f.name}:{f.channels}@{f.stride}" for f in levels),
            "weights": info.weights, "sha256": info.weights_sha256[:12],
            "origin": info.weights_origin.get("origin", "")}


def _keys(pattern: str) -> list[str]:
    from slice2vol.encoders import ENCODERS, open_builder

    keys = ENCODERS.names(pattern)
    if not keys and open_builder(pattern) is not None:  # an exact open-registry key
        keys = [pattern]
    if not keys:
        raise ValueError(f"no encoder matches {pattern!r}; presets: {', '.join(ENCODERS.names())}; any "
                         f"timm/<name>, openclip/<arch>:<tag> or hf/<repo_id> the libraries know also builds")
    return keys


def _write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        import csv

        columns = list(dict.fromkeys(c for row in rows for c in row))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run(args: argparse.Namespace) -> int:
    from slice2vol.encoders import ENCODERS
    from slice2vol.progress import track

    keys = _keys(args.pattern)
    device = resolve_device(args.device)
    rows = []
    chosen = track(keys, desc="encoders", unit="key", enabled=progress_enabled(args) and args.details)
    for key in chosen:
        if args.details:
            rows.append(_row_from_build(key, args.weights, device))
        else:
            rows.append(_row_from_meta(key, ENCODERS.meta(key)))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        columns = list(dict.fromkeys(c for row in rows for c in row))
        widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
        print("  ".join(c.ljust(widths[c]) for c in columns))
        for row in rows:
            print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
        if not args.details:
            print("\nweights: random | pretrained (alias imagenet; local files, never downloaded) | package | "
                  "hub[:tag] | /path/to/file-or-dir   (--details builds each and shows its preprocessing)")
    if args.out:
        _write(rows, Path(args.out))
    return 0
