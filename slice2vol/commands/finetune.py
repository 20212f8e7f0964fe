"""``slice2vol finetune``: fine-tune a 2D encoder on a cohort's slices and write a loadable checkpoint.

One process, or one rank of a DistributedDataParallel job when started by torchrun.
"""

from __future__ import annotations

import argparse

from slice2vol.commands import _common

HELP = "fine-tune a 2D encoder on a cohort's slices (frozen | last_blocks | lora; simclr | supervised)"
DESCRIPTION = HELP + """

Flags are applied before the KEY=VALUE overrides, so an explicit override wins.

examples:
  slice2vol finetune --config configs/finetune/vit_lora_simclr.yaml --manifest cohort.csv --out runs/ft-lora
  slice2vol finetune --config configs/finetune/resnet_last_blocks_supervised.yaml --manifest cohort.csv \\
      --label sex --train-ids train_ids.txt --out runs/ft-sex lora.rank=4 train.lr=3e-4
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_config(parser, help="YAML FinetuneConfig: a file, or a packaged config by name (finetune/cpu_smoke)")
    _common.add_manifest(parser, required=True)
    _common.add_out(parser, required=True, help="output folder (encoder.safetensors, finetune.json)")
    _common.add_device(parser, config_key="train.device")
    _common.add_progress(parser)
    parser.add_argument("--encoder", help="2D encoder key, e.g. timm/vit_small_patch16_224")
    parser.add_argument("--weights", type=_common.weights_arg, help="base weights: random, hub[:tag] or a local file")
    parser.add_argument("--mode", choices=("frozen", "last_blocks", "lora"))
    parser.add_argument("--objective", choices=("simclr", "supervised"))
    parser.add_argument("--label", help="label column (supervised objective)")
    parser.add_argument("--train-ids", metavar="FILE|all", help="training subjects, one ID per line, or 'all'")
    parser.add_argument("--steps", type=int, help="train.steps")
    parser.add_argument("--no-resume", action="store_true",
                        help="start again even if OUT/train_state exists (train.checkpoint_every)")
    _common.add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys
    from pathlib import Path

    from slice2vol.config import load_config, resolve_config_path
    from slice2vol.data import load_manifest
    from slice2vol.finetune import FinetuneConfig, run_finetune

    flags = [f"{attr}={getattr(args, attr)}" for attr in ("encoder", "weights", "mode", "objective", "label")
             if getattr(args, attr)]
    if args.steps is not None:
        flags.append(f"train.steps={args.steps}")
    if args.train_ids:
        flags.append(f"data.train_ids={args.train_ids}")
    if args.device is not None:  # else the config file's train.device stands
        flags.append(f"train.device={args.device}")
    config = resolve_config_path(args.config) if args.config else None  # a file, or a packaged config by name
    cfg = load_config(FinetuneConfig, config, flags + _common.overrides_of(args))
    rank = int(os.environ.get("RANK", "0") or 0)
    _common.add_run_log(args.out, "slice2vol.log" if rank == 0 else f"slice2vol.rank{rank}.log")
    cohort = load_manifest(args.manifest)
    path = run_finetune(cfg, cohort, args.out, progress=_common.progress_enabled(args), resume=not args.no_resume)
    if rank != 0:
        return 0
    record = json.loads((Path(args.out) / "finetune.json").read_text())
    losses = record["losses"]
    print(f"{path}  ({cfg.mode}/{cfg.objective}, {record['steps']} steps, loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}, {record['n_slices']} slices of {len(record['trained_subjects'])} subjects, "
          f"{record['world_size']} process(es))")
    print(f"load with: {record['load_with']}")
    for failure in record["failures"]:  # the manifest's rows left out and the subjects that gave no slices
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if record["failures"] or cohort.failures else 0
