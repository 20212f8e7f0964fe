"""``slice2vol pretrain``: self-supervised pretraining of a 2D or 3D encoder on a cohort."""

from __future__ import annotations

import argparse

HELP = "self-supervised pretraining (simclr, mae, autoencoder, jigsaw, rotation, genesis) on a cohort"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", help="SSL method (default: the config's)")
    parser.add_argument("--dims", type=int, choices=(2, 3), help="3 = crops of volumes, 2 = slices (default: config)")
    parser.add_argument("--config", help="YAML SSLConfig, e.g. configs/ssl/simclr_cpu.yaml")
    parser.add_argument("--manifest", required=True, help="cohort CSV manifest")
    parser.add_argument("--out", required=True, help="run directory (checkpoints in OUT/last, metrics, loss curve)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:1)")
    parser.add_argument("--no-resume", action="store_true", help="start again even if OUT/last exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.lr=3e-4 data.crop_size=[64,64,64]")


def run(args: argparse.Namespace) -> int:
    from slice2vol.config import load_config
    from slice2vol.data.manifest import load_manifest
    from slice2vol.ssl import SSLConfig
    from slice2vol.ssl.trainer import pretrain

    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"method={args.method}")
    if args.dims:
        overrides.append(f"spatial_dims={args.dims}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(SSLConfig, args.config, overrides)
    cohort = load_manifest(args.manifest)
    if cohort.failures:
        print(cohort.failure_report())
    result = pretrain(cfg, args.out, cohort=cohort, resume=not args.no_resume, progress=not args.no_progress)
    print(f"{cfg.method} {cfg.spatial_dims}D: {result.step} steps, final loss {result.final_loss:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics: {result.out_dir / 'metrics.csv'}  loss curve: {result.loss_curve}")
    if cfg.spatial_dims == 2:
        print(f"use it for slices: slice2vol cache --encoder ssl2d/{cfg.method} --weights {result.checkpoint} ...")
    else:
        print(f"embed volumes: slice2vol embed --checkpoint {result.checkpoint} --manifest {args.manifest} "
              f"--store STORE.h5 --name ssl3d/{cfg.method}")
    return 1 if cohort.failures else 0
