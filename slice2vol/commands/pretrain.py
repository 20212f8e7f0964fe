"""``slice2vol pretrain``: self-supervised pretraining of a 2D or 3D encoder on a cohort.

One process, or one rank of a DistributedDataParallel job when started by torchrun
(``scripts/torchrun_pretrain.sh``: several GPUs, several nodes under SLURM).
"""

from __future__ import annotations

import argparse

from slice2vol.commands import _common

HELP = "self-supervised pretraining (simclr, mae, autoencoder, jigsaw, rotation, genesis) on a cohort"
DESCRIPTION = HELP + """

The run folder holds last/ (the newest checkpoint), step_<N>/ copies (train.keep_every), metrics.csv
(loss, lr, samples/s, seconds per step, cumulative FLOPs) and loss_curve.png; rerunning the same
command resumes. Flags are applied before the KEY=VALUE overrides, so an explicit override wins.

examples:
  slice2vol pretrain --config configs/ssl/simclr_cpu.yaml --manifest cohort.csv --out runs/simclr3d
  slice2vol pretrain --config configs/ssl/simclr_cpu.yaml --dims 2 --manifest cohort.csv --out runs/simclr2d \\
      train.budget_flops=2e15 data.cache_dir=runs/volumes
  torchrun --nproc_per_node 4 -m slice2vol.cli pretrain --config configs/ssl/simclr_gpu.yaml ...
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_config(parser, help="YAML SSLConfig: a file, or a packaged config by name (ssl/simclr_cpu)")
    _common.add_manifest(parser, required=True)
    _common.add_out(parser, required=True, help="run directory (checkpoints in OUT/last, metrics, loss curve)")
    _common.add_device(parser, config_key="train.device")
    _common.add_progress(parser)
    parser.add_argument("--method", help="SSL method (default: the config's)")
    parser.add_argument("--dims", type=int, choices=(2, 3), help="3 = crops of volumes, 2 = slices (default: config)")
    parser.add_argument("--steps", type=int, help="train.steps")
    parser.add_argument("--subjects", metavar="FILE",
                        help="pretrain on these subject IDs only (one per line; e.g. the training folds)")
    parser.add_argument("--no-resume", action="store_true", help="start again even if OUT/last exists")
    _common.add_overrides(parser)


def _read_ids(path: str) -> list[str]:
    from slice2vol.data.manifest import read_id_list

    return read_id_list(path, "--subjects")


def run(args: argparse.Namespace) -> int:
    from slice2vol.config import load_config, resolve_config_path
    from slice2vol.data.manifest import load_manifest
    from slice2vol.ssl import SSLConfig
    from slice2vol.ssl.distributed import env_world_size
    from slice2vol.ssl.trainer import pretrain

    flags = []
    if args.method:
        flags.append(f"method={args.method}")
    if args.dims:
        flags.append(f"spatial_dims={args.dims}")
    if args.steps is not None:
        flags.append(f"train.steps={args.steps}")
    if args.device is not None:  # else the config file's train.device stands
        flags.append(f"train.device={args.device}")
    config = resolve_config_path(args.config) if args.config else None  # a file, or a packaged config by name
    cfg = load_config(SSLConfig, config, flags + _common.overrides_of(args))
    rank = _rank()
    _common.add_run_log(args.out, "slice2vol.log" if rank == 0 else f"slice2vol.rank{rank}.log")
    cohort = load_manifest(args.manifest)
    if cohort.failures and rank == 0:
        print(cohort.failure_report())
    subject_ids = _read_ids(args.subjects) if args.subjects else None
    if subject_ids is not None:
        from slice2vol.data.manifest import check_ids_known

        # the file's fault, so the file is named (the trainer would blame the manifest)
        left_out = {f.subject_id for f in cohort.failures}
        check_ids_known(args.subjects, subject_ids, [*cohort.ids, *left_out], "the manifest")
        # a listed subject whose files failed is reported above with the manifest's failures; the run
        # goes on with the others, as it does without --subjects
        subject_ids = [s for s in subject_ids if s not in left_out]
    result = pretrain(cfg, args.out, cohort=cohort, resume=not args.no_resume,
                      progress=_common.progress_enabled(args), subject_ids=subject_ids)
    if rank != 0:
        return 0
    if result.checkpoint is None:
        raise ValueError(f"{args.out}: no checkpoint was written (train.steps={cfg.train.steps}, "
                         f"{result.step} step(s) done)")
    import json

    failures = json.loads((result.checkpoint / "meta.json").read_text()).get("failures", [])
    shown = {f.message for f in cohort.failures} | {str(f) for f in cohort.failures}
    for failure in failures:
        if failure not in shown:  # meta.json lists the manifest's own rows too: printed once, above
            print(f"failed: {failure}")
    cost = result.cost or {}
    flops = f", {cost['flops_per_step']:.3g} FLOPs/step" if cost.get("flops_per_step") else ""
    world = env_world_size()
    print(f"{cfg.method} {cfg.spatial_dims}D: {result.step}/{result.total_steps} steps, final loss "
          f"{result.final_loss:.4f}, {result.wall_s:.0f} s wall on {world} process(es){flops}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics: {result.out_dir / 'metrics.csv'}  loss curve: {result.loss_curve}")
    if cfg.spatial_dims == 2:
        print(f"use it for slices: slice2vol cache --encoder ssl2d/{cfg.method} --weights {result.checkpoint} ...")
    else:
        print(f"embed volumes: slice2vol embed --checkpoint {result.checkpoint} --manifest {args.manifest} "
              f"--store STORE.h5 --name ssl3d/{cfg.method}")
    return 1 if cohort.failures or failures else 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0") or 0)
