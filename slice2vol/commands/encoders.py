"""``slice2vol encoders``: list registered 2D encoders with their sizes.

The default listing reads registry metadata only (fast, no model built, no weights touched);
``--details`` builds each selected encoder with random weights to report the resolved
preprocessing and the exact parameter count.
"""

from __future__ import annotations

import argparse
import json

HELP = "list the 2D encoders (keys, embedding size, input size, parameters)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="glob on keys, e.g. 'timm/vit*' (default: all)")
    parser.add_argument("--details", action="store_true",
                        help="build each encoder (random weights) and show resolved preprocessing")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _row_from_meta(key: str, meta: dict) -> dict:
    return {"key": key, "family": meta.get("family", ""), "embed_dim": meta.get("embed_dim", ""),
            "input": meta.get("input_size", ""), "params_M": meta.get("params_m", ""),
            "img_size": meta.get("img_size", "")}


def _row_from_build(key: str) -> dict:
    import torch

    from slice2vol.encoders import build_encoder

    encoder = build_encoder(key)
    info = encoder.info
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    with torch.inference_mode():
        tokens, grid = encoder.tokens(torch.zeros(1, 1, *info.input_size))
    return {"key": key, "family": info.source, "embed_dim": info.embed_dim,
            "input": "x".join(map(str, info.input_size)), "params_M": round(params, 2),
            "tokens": f"{grid[0]}x{grid[1]}x{tokens.shape[-1]}", "pooling": info.pooling,
            "resize": info.resize + (f" {info.resize_size} (crop_pct {info.crop_pct:.3f})"
                                     if info.resize == "shorter" else ""),
            "interp": info.interpolation, "mean": ",".join(f"{v:.3f}" for v in info.mean),
            "std": ",".join(f"{v:.3f}" for v in info.std)}


def run(args: argparse.Namespace) -> int:
    from slice2vol.encoders import ENCODERS

    keys = ENCODERS.names(args.pattern)
    if not keys:
        raise ValueError(f"no encoder matches {args.pattern!r}; known: {', '.join(ENCODERS.names())}")
    rows = []
    for key in keys:
        if args.details:
            rows.append(_row_from_build(key))
        else:
            rows.append(_row_from_meta(key, ENCODERS.meta(key)))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        columns = list(rows[0])
        widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
        print("  ".join(c.ljust(widths[c]) for c in columns))
        for row in rows:
            print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
        if not args.details:
            print("\nweights: random | hub[:tag] | /path/to/file-or-dir   (--details builds each and "
                  "shows its preprocessing)")
    return 0
