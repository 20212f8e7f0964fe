"""``slice2vol finetune``: fine-tune a 2D encoder on a cohort's slices and write a loadable checkpoint."""

from __future__ import annotations

import argparse

HELP = "fine-tune a 2D encoder on a cohort's slices (frozen | last_blocks | lora; simclr | supervised)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config, e.g. configs/finetune/vit_lora_simclr.yaml")
    parser.add_argument("--encoder", help="2D encoder key, e.g. timm/vit_small_patch16_224")
    parser.add_argument("--weights", help="base weights: random, hub[:tag] or a local file")
    parser.add_argument("--manifest", required=True, help="cohort CSV manifest")
    parser.add_argument("--mode", choices=("frozen", "last_blocks", "lora"))
    parser.add_argument("--objective", choices=("simclr", "supervised"))
    parser.add_argument("--label", help="label column (supervised objective)")
    parser.add_argument("--train-ids", metavar="FILE|all", help="training subjects, one ID per line, or 'all'")
    parser.add_argument("--steps", type=int, help="optimisation steps")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", required=True, help="output folder (encoder.safetensors, finetune.json)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. lora.rank=4 train.lr=3e-4 data.slice_size=112")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from slice2vol.config import load_config
    from slice2vol.data import load_manifest
    from slice2vol.finetune import FinetuneConfig, run_finetune

    cfg = load_config(FinetuneConfig, args.config, args.set)
    for flag, attr in (("encoder", "encoder"), ("weights", "weights"), ("mode", "mode"),
                       ("objective", "objective"), ("label", "label")):
        if getattr(args, flag):
            setattr(cfg, attr, getattr(args, flag))
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.device:
        cfg.train.device = args.device
    if args.train_ids:
        cfg.data.train_ids = args.train_ids
    cohort = load_manifest(args.manifest)
    path = run_finetune(cfg, cohort, args.out, progress=not args.no_progress)
    record = json.loads((Path(args.out) / "finetune.json").read_text())
    losses = record["losses"]
    print(f"{path}  ({cfg.mode}/{cfg.objective}, {record['steps']} steps, loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}, {record['n_slices']} slices of {len(record['trained_subjects'])} subjects)")
    print(f"load with: {record['load_with']}")
    return 1 if record["failures"] else 0
