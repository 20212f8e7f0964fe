"""Regenerates the compute table of docs/ssl.md: FLOPs and CPU seconds per step of every SSL method in 2D and
3D, and the steps a common FLOP budget buys each of them (what ``train.budget_flops`` resolves to).

For each ``configs/ssl/<method>_cpu.yaml`` in 3D (crops) and 2D (``--dims 2``: slices), one real batch of
the cohort is drawn and the trainer's own probe (:func:`slice2vol.ssl.compute.count_step_flops`) counts
the forward + backward FLOPs of a step; :func:`slice2vol.ssl.compute.time_step` times it (median of
``--repeats`` steps after a warm-up, single thread unless OMP_NUM_THREADS says otherwise). The budget
defaults to what 150 steps of 3D SimCLR cost, the CPU configs' default run.

    python scripts/reproduce/ssl_compute.py [--docs docs/ssl.md]

FLOPs do not depend on the machine; the seconds do (and on its load): quote ratios between rows.
"""

from __future__ import annotations

import argparse
import os

from ssl_common import REPO, load_cohort, markdown, publish, stamp

METHODS = ("autoencoder", "genesis", "mae", "simclr", "jigsaw", "rotation")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="cohort CSV (default: the IXI dev cohort)")
    parser.add_argument("--subjects", type=int, default=8, help="subjects loaded to draw the batch from")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--budget-steps", type=int, default=150, help="budget = this many 3D SimCLR steps")
    parser.add_argument("--docs", help="write the table into this markdown file (between BEGIN/END markers)")
    args = parser.parse_args(argv)

    import torch

    from slice2vol.config import load_config
    from slice2vol.ssl import SSLConfig, build_method
    from slice2vol.ssl.compute import StepCost, count_step_flops, resolve_budget_steps, time_step
    from slice2vol.ssl.data import VolumeBank, make_dataset
    from slice2vol.ssl.trainer import seed_everything

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    cohort = load_cohort(args.manifest)
    cohort = cohort.subset(cohort.ids[: args.subjects])
    banks: dict = {}
    measured = []
    for method in METHODS:
        for dims in (3, 2):
            cfg = load_config(SSLConfig, REPO / "configs" / "ssl" / f"{method}_cpu.yaml", [f"spatial_dims={dims}"])
            key = (tuple(cfg.data.volume_size), cfg.data.cache_dtype)
            if key not in banks:
                banks[key] = VolumeBank.from_cohort(cohort, cfg.data.volume, cfg.data.volume_size, progress=False)
            seed_everything(0)
            model = build_method(cfg)
            batch = make_dataset(banks[key], dims, cfg.data).sample(cfg.train.batch_size)
            cost = count_step_flops(model, batch)
            seconds = time_step(model, batch, lambda m, b: m(b)[0], args.repeats)
            measured.append((method, dims, cfg, cost, seconds))
            print(f"{method} {dims}D: {cost.flops / 1e9:.2f} GFLOPs/step, {seconds:.2f} s/step", flush=True)
    budget = next(c.flops for m, d, _, c, _ in measured if (m, d) == ("simclr", 3)) * args.budget_steps
    rows = []
    for method, dims, cfg, cost, seconds in measured:
        steps = resolve_budget_steps(type(cfg.train)(budget_flops=budget), StepCost(cost.flops, cost.flops_per_sample))
        size = "x".join(str(s) for s in cfg.input_size)
        rows.append([method, f"{dims}D", size, str(cfg.train.batch_size), f"{cost.flops / 1e9:.2f}",
                     f"{cost.flops_per_sample / 1e9:.3f}", f"{seconds:.2f}", str(steps),
                     ", ".join(cost.uncounted_ops) or "none"])
    command = "python scripts/reproduce/ssl_compute.py"
    text = (f"`{command}` ({stamp()}; {torch.get_num_threads()} thread(s); budget = {args.budget_steps} steps of 3D "
            f"SimCLR = {budget / 1e12:.2f} TFLOPs; seconds vary with the machine and its load, FLOPs do not)\n\n"
            + markdown(["method", "dims", "input", "batch", "GFLOPs/step", "GFLOPs/sample", "CPU s/step",
                        "steps in budget", "heavy ops not counted"], rows))
    publish({"ssl_compute": text}, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
