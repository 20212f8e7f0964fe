#!/usr/bin/env python
"""Encoder throughput under allocator variants, interleaved, as a fraction of the fp32 matmul ceiling.

Every measurement runs in a fresh child process, because allocator settings are per process (and
glibc reads its ``MALLOC_*`` variables at start-up). For each round, each encoder and each variant
a child builds the encoder, runs ``--warmup`` untimed batches and ``--repeats`` timed batches of
``encode`` (preprocessing included, ``torch.inference_mode``, channels_last for CNNs, no autocast on
CPU), and reports slices/s plus the system time, user time and minor page faults of the timed
batches (``resource.getrusage`` in the child); the parent adds the whole child's figures
(``getrusage(RUSAGE_CHILDREN)`` differences). Variants alternate A B, B A, ... across rounds, so the
drift of a shared or virtual machine falls on both.

The ceiling is the fp32 matmul rate (``--ceiling-size`` squared, same threads; on CUDA with
``--amp`` the autocast dtype's) measured in a child of every round; each encoder is shown as a
fraction of the best ceiling of the run. FLOPs of one
slice are counted by ``torch.utils.flop_counter.FlopCounterMode`` with attention forced to the math
SDPA kernel (the fused CPU kernel is invisible to the counter); a multiply-add counts as 2.

Variants (``--variants``, first is the reference of the speed-up column):
    default   glibc's malloc with its defaults (SLICE2VOL_ALLOCATOR=system), network as built
    allocator what the package sets at start-up (slice2vol.runtime.configure_runtime defaults), network
              as built: the allocator's share of the gain
    project   what ``slice2vol cache`` runs: the package's allocator settings and BatchNorm folded into
              the convolutions (``Encoder.optimize(fold_bn=True)``) = ``allocator+fold``
    plain     the network as a researcher runs it from timm/torchvision: glibc defaults, NCHW memory
              format, BatchNorm kept = ``default+nchw`` (not the reference of issue 17's target, which
              compares allocator settings with everything else equal)
    env16g    glibc defaults plus MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 16 GiB in the
              environment (the measurement of issue 17)
    glibc:... any SLICE2VOL_ALLOCATOR value, e.g. glibc:mmap_threshold=32M or glibc:trim_threshold=1G
    preload:jemalloc | preload:tcmalloc   the library in LD_PRELOAD (skipped when not installed)
    VARIANT+fold  any of these with BatchNorm folded (e.g. ``default+fold``: folding alone)
    VARIANT+nchw  any of these in NCHW memory format (CNNs otherwise run channels_last)
Every variant runs with the same thread count (``--threads``, default: the cores this process may use)
and the same memory format (channels_last for CNNs unless ``--no-channels-last``) except ``+nchw`` variants.

Examples:
    python scripts/bench_encoders.py --encoders tv/mobilenet_v2 timm/resnet50 --rounds 3
    python scripts/bench_encoders.py --encoders tv/mobilenet_v2 --variants default project env16g \\
        glibc:trim_threshold=1G glibc:mmap_threshold=1G --rounds 2 --repeats 3
    python scripts/bench_encoders.py --device cuda --variants project --amp bf16 --batch-size auto
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_ENCODERS = ["tv/mobilenet_v2", "timm/resnet18", "timm/resnet50", "timm/efficientnet_lite0",
                    "timm/vit_small_patch16_224"]
# environment of each named variant (on top of a child environment cleared of allocator settings)
PRESETS = {
    "default": {"SLICE2VOL_ALLOCATOR": "system"},
    "allocator": {},
    "env16g": {"SLICE2VOL_ALLOCATOR": "system", "MALLOC_MMAP_THRESHOLD_": str(16 << 30),
               "MALLOC_TRIM_THRESHOLD_": str(16 << 30)},
}
_ALLOCATOR_VARS = ("SLICE2VOL_ALLOCATOR", "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_",
                   "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_")


ALIASES = {"project": "allocator+fold", "plain": "default+nchw"}


def split_variant(variant: str) -> tuple[str, bool, bool]:
    """(allocator part, fold BatchNorm?, NCHW memory format?) of a variant name (see ``ALIASES``)."""
    base, *suffixes = variant.split("+")
    base, *implied = ALIASES.get(base, base).split("+")
    flags = set(suffixes) | set(implied)
    unknown = flags - {"fold", "nchw"}
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown suffix(es) {sorted(unknown)}; use +fold and/or +nchw")
    return base, "fold" in flags, "nchw" in flags


def variant_env(variant: str) -> dict[str, str] | None:
    """Environment of a child running ``variant``; None when it cannot run here (library missing)."""
    variant = split_variant(variant)[0]
    env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if variant in PRESETS:
        env.update(PRESETS[variant])
    elif variant.startswith("preload:"):
        from slice2vol.runtime import find_allocator_library

        path = find_allocator_library(variant.split(":", 1)[1])
        if path is None:
            return None
        env["LD_PRELOAD"] = path
    else:
        from slice2vol.runtime import parse_allocator

        parse_allocator(variant)  # fail in the parent, with the message, not in every child
        env["SLICE2VOL_ALLOCATOR"] = variant
    return env


# -- child side -------------------------------------------------------------------------------------
def count_flops(encoder, image_size: tuple[int, int]) -> float:
    """FLOPs of ``encode`` for one (1, 1, H, W) slice (math attention so SDPA is counted)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 1, *image_size, device=encoder.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        encoder.encode(x)
    return float(counter.get_total_flops())


def _usage() -> tuple[float, float, int, int]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt, u.ru_majflt


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_encoder(args: argparse.Namespace) -> dict:
    """Times one encoder in this process; returns rates and the rusage of the timed batches."""
    import torch

    from slice2vol.encoders import build_encoder
    from slice2vol.runtime import configure_runtime

    runtime = configure_runtime(threads=args.threads)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    torch.manual_seed(0)
    encoder = build_encoder(args.child, **kwargs).to(args.device).eval()
    size = (args.slice_size, args.slice_size)
    flops = count_flops(encoder, size) if args.count_flops else None
    encoder.optimize(channels_last=False if args.no_channels_last else None, compile=args.compile, amp=args.amp,
                     fold_bn=args.fold_bn)
    batch = args.batch_size
    if batch == "auto":
        from slice2vol.encoders.base import pick_batch_size

        batch = pick_batch_size(encoder, args.device, max_batch=args.max_batch)
    batch = int(batch)
    x = torch.rand(batch, 1, *size, device=args.device)
    rates = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            encoder.encode(x)
        _sync(encoder.device)
        before = _usage()
        for _ in range(args.repeats):
            start = time.perf_counter()
            encoder.encode(x)
            _sync(encoder.device)
            rates.append(batch / (time.perf_counter() - start))
        after = _usage()
    user, system, minflt, majflt = (b - a for a, b in zip(before, after))
    return {"encoder": args.child, "input": list(encoder.info.input_size), "batch": batch, "rates": rates,
            "slices_per_s": statistics.median(rates), "flops": flops, "timed_user_s": user, "timed_sys_s": system,
            "timed_minflt": minflt, "timed_majflt": majflt, "runtime": runtime, "torch_threads": torch.get_num_threads(),
            **{key: encoder.inference_settings()[key] for key in ("channels_last", "batchnorm_folded")}}


def child_ceiling(args: argparse.Namespace) -> dict:
    """Matmul GFLOP/s, best of a few n x n products, same threads as the encoders.

    fp32, or on CUDA with ``--amp`` the autocast dtype (the encoders' matmuls then run in it).
    """
    import torch

    from slice2vol.runtime import configure_runtime

    configure_runtime(threads=args.threads)
    n = args.ceiling_size
    dtype = torch.float32
    if args.amp and torch.device(args.device).type == "cuda":
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    a = torch.rand(n, n, device=args.device, dtype=dtype)
    b = torch.rand(n, n, device=args.device, dtype=dtype)
    device = a.device
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * n**3 / best / 1e9, "size": n, "threads": torch.get_num_threads(),
            "dtype": str(dtype).replace("torch.", "")}


# -- parent side ------------------------------------------------------------------------------------
def _children_usage() -> tuple[float, float, int]:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime, u.ru_stime, u.ru_minflt


def run_child(argv: list[str], env: dict[str, str]) -> dict:
    """Runs this script as a child; returns its JSON line plus the child's whole rusage."""
    before = _children_usage()
    proc = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True)
    after = _children_usage()
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_user_s"], out["child_sys_s"], out["child_minflt"] = (b - a for a, b in zip(before, after))
    return out


def _common_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--device", args.device, "--batch-size", str(args.batch_size), "--slice-size", str(args.slice_size),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--ceiling-size", str(args.ceiling_size),
            "--max-batch", str(args.max_batch)]
    for flag, value in (("--threads", args.threads), ("--img-size", args.img_size), ("--amp", args.amp)):
        if value:
            argv += [flag, str(value)]
    if args.no_channels_last:
        argv.append("--no-channels-last")
    if args.compile:
        argv.append("--compile")
    return argv


def summarise(results: list[dict], variants: list[str], ceiling: float) -> list[dict]:
    """One row per (encoder, variant): medians over rounds, speed-up against the first variant."""
    rows = []
    flops = {r["encoder"]: r["flops"] for r in results if r.get("flops")}
    for encoder in dict.fromkeys(r["encoder"] for r in results):
        reference = None
        for variant in variants:
            runs = [r for r in results if r["encoder"] == encoder and r["variant"] == variant]
            if not runs:
                continue
            rate = statistics.median(r["slices_per_s"] for r in runs)
            batches = sum(len(r["rates"]) for r in runs)
            row = {"encoder": encoder, "variant": variant, "input": runs[0]["input"], "batch": runs[0]["batch"],
                   "rounds": len(runs), "slices_per_s": rate, "per_round": [r["slices_per_s"] for r in runs],
                   "gflop_per_slice": flops.get(encoder, 0) / 1e9,
                   "timed_sys_s": sum(r["timed_sys_s"] for r in runs) / len(runs),
                   "timed_user_s": sum(r["timed_user_s"] for r in runs) / len(runs),
                   "minflt_per_batch": sum(r["timed_minflt"] for r in runs) / batches,
                   "child_sys_s": sum(r["child_sys_s"] for r in runs) / len(runs),
                   "child_user_s": sum(r["child_user_s"] for r in runs) / len(runs),
                   "child_minflt": sum(r["child_minflt"] for r in runs) / len(runs),
                   "allocator": runs[0]["runtime"].get("allocator"), "glibc": runs[0]["runtime"].get("glibc"),
                   "batchnorm_folded": runs[0].get("batchnorm_folded", 0),
                   "channels_last": runs[0].get("channels_last"),
                   "threads": runs[0]["torch_threads"]}
            slices = sum(len(r["rates"]) * r["batch"] for r in runs)
            # CPU seconds per slice: what other processes on a shared machine distort least
            row["cpu_ms_per_slice"] = 1000 * sum(r["timed_user_s"] + r["timed_sys_s"] for r in runs) / slices
            row["achieved_gflops"] = rate * row["gflop_per_slice"]
            row["of_ceiling"] = row["achieved_gflops"] / ceiling if ceiling else None
            reference = reference or (rate, row["cpu_ms_per_slice"])
            row["speedup"] = rate / reference[0]
            row["cpu_speedup"] = reference[1] / row["cpu_ms_per_slice"]
            rows.append(row)
    return rows


def print_table(rows: list[dict], ceiling: float, repeats: int, dtype: str = "fp32") -> None:
    print(f"\n| encoder | variant | BN folded | layout | slices/s (per round) | x first | CPU ms/slice | x first (CPU) | GFLOP/slice | "
          f"% of ceiling | sys s / user s (timed {repeats} batches) | minor faults / batch | child sys s / user s | "
          f"child faults |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rounds = ", ".join(f"{v:.1f}" for v in r["per_round"])
        pct = f"{100 * r['of_ceiling']:.0f}%" if r["of_ceiling"] else "-"
        print(f"| {r['encoder']} | {r['variant']} | {r.get('batchnorm_folded', 0)} | {'NHWC' if r.get('channels_last') else 'NCHW'} | {r['slices_per_s']:.1f} ({rounds}) | {r['speedup']:.2f}x | "
              f"{r['cpu_ms_per_slice']:.1f} | {r['cpu_speedup']:.2f}x | {r['gflop_per_slice']:.2f} | {pct} | "
              f"{r['timed_sys_s']:.2f} / {r['timed_user_s']:.2f} | "
              f"{r['minflt_per_batch']:,.0f} | {r['child_sys_s']:.1f} / {r['child_user_s']:.1f} | "
              f"{r['child_minflt']:,.0f} |")
    print(f"\nceiling: {dtype} matmul {ceiling:.1f} GFLOP/s (best of the run)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=DEFAULT_ENCODERS)
    p.add_argument("--variants", nargs="+", default=["default", "allocator", "project"],
                   help="variants (see above); the first is the reference")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (A B, B A, ...)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per child")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per child (oneDNN caches, heap growth)")
    p.add_argument("--batch-size", default="32", help="slices per batch, or 'auto' (pick_batch_size probe)")
    p.add_argument("--max-batch", type=int, default=256, help="upper bound of --batch-size auto")
    p.add_argument("--slice-size", type=int, default=224, help="side of the input slices (before resizing)")
    p.add_argument("--img-size", type=int, default=None, help="encoder input size (default: native)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the cores available)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW for CNNs")
    p.add_argument("--compile", action="store_true", help="torch.compile (slow first call)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast, CUDA only")
    p.add_argument("--ceiling-size", type=int, default=2048, help="n of the n x n fp32 matmul ceiling")
    p.add_argument("--json", default=None, help="also write rows, raw runs and ceilings to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fold-bn", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        out = child_ceiling(args) if args.child == "@ceiling" else child_encoder(args)
        print(json.dumps(out))
        return 0
    envs = {v: variant_env(v) for v in args.variants}
    for v in [v for v, env in envs.items() if env is None]:
        print(f"# variant {v}: library not installed here, skipped")
    variants = [v for v in args.variants if envs[v] is not None]
    from slice2vol.runtime import resolve_threads

    threads = args.threads or resolve_threads()[0]
    args.threads = threads
    common = _common_argv(args)
    print(f"# device={args.device} threads={threads} batch={args.batch_size} repeats={args.repeats} "
          f"warmup={args.warmup} rounds={args.rounds} variants={' '.join(variants)} python={sys.version.split()[0]}",
          flush=True)
    results, ceilings = [], []
    for rnd in range(args.rounds):
        ceiling = run_child(["--child", "@ceiling", *common], envs[variants[-1]])
        ceilings.append(ceiling["gflops"])
        print(f"round {rnd}: {ceiling['dtype']} matmul ceiling {ceilings[-1]:.1f} GFLOP/s", flush=True)
        order = variants if rnd % 2 == 0 else variants[::-1]
        for key in args.encoders:
            for variant in order:
                argv = ["--child", key, *common] + (["--count-flops"] if rnd == 0 and variant == order[0] else [])
                _, fold, nchw = split_variant(variant)
                argv += (["--fold-bn"] if fold else []) + (["--no-channels-last"] if nchw and not args.no_channels_last
                                                           else [])
                out = run_child(argv, envs[variant])
                out["variant"], out["round"] = variant, rnd
                results.append(out)
                print(f"  {key:32s} {variant:28s} {out['slices_per_s']:8.1f} slices/s  timed sys "
                      f"{out['timed_sys_s']:5.2f} s user {out['timed_user_s']:6.2f} s  minor faults "
                      f"{out['timed_minflt']:>9,}  (child: sys {out['child_sys_s']:.1f} s, "
                      f"{out['child_minflt']:,} faults)", flush=True)
    ceiling = max(ceilings)
    rows = summarise(results, variants, ceiling)
    print_table(rows, ceiling, args.repeats, "fp32" if not args.amp or args.device == "cpu" else args.amp)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": results, "ceilings": ceilings,
                                               "args": vars(args)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
