"""Peak resident memory of ``slice2vol pretrain`` against cohort size: streaming vs in-memory volumes.

For each cohort size N and each data mode, a synthetic cohort of N subjects is written (a few distinct
NIfTI heads, shared round-robin, so writing stays cheap while every subject is loaded, prepared and
sampled on its own), then ``slice2vol pretrain`` runs in a child process for a fixed number of steps;
its peak RSS comes from ``os.wait4`` (that child only). With ``data.streaming=true`` the volumes are
prepared to per-subject HDF5 files and read crop by crop, so the peak should not grow with N; with
``data.streaming=false`` every volume is held in memory and the peak grows by about
N x volume_size^3 x 4 bytes.

    python scripts/bench_pretrain_rss.py                       # N = 16, 64, 256; 64^3 volumes
    python scripts/bench_pretrain_rss.py --sizes 8 32 --steps 2   # quick check
    python scripts/bench_pretrain_rss.py --docs docs/ssl.md       # rewrites the table ``ssl_rss`` there

Prints one row per (mode, N) and the ratio of the largest to the smallest cohort's peak per mode.
Peak RSS does not depend on machine load; the wall times printed next to it do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_cohort(folder: Path, n: int, distinct: int = 8, shape=(96, 112, 96)) -> Path:
    """A manifest of ``n`` subjects over ``distinct`` synthetic heads (ellipsoids with inner blobs)."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for k in range(distinct):
        path = folder / f"head{k}.nii.gz"
        if not path.exists():
            rng = np.random.default_rng(k)
            r = np.sqrt(((grid / rng.uniform(0.7, 0.9, 3)[:, None, None, None]) ** 2).sum(0))
            vol = np.clip(1.1 - r, 0, None) * 100
            for _ in range(6):
                c = rng.uniform(-0.5, 0.5, 3)[:, None, None, None]
                vol += rng.uniform(-30, 30) * np.exp(-((grid - c) ** 2).sum(0) / rng.uniform(0.01, 0.05))
            vol = np.where(r < 1, vol, 0) + rng.normal(0, 1, shape)
            nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
        files.append(path.name)
    manifest = folder / f"cohort{n}.csv"
    rows = ["subject_id,t1"] + [f"sub{i:05d},{files[i % distinct]}" for i in range(n)]
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def run_child(manifest: Path, out: Path, streaming: bool, steps: int, volume: int) -> dict:
    """Runs one pretraining in a child process; returns its peak RSS (MiB) and wall time."""
    cmd = [sys.executable, "-m", "slice2vol.cli", "pretrain", "--config", str(REPO / "configs/ssl/rotation_cpu.yaml"),
           "--manifest", str(manifest), "--out", str(out), "--device", "cpu", "--no-progress", "--no-resume",
           f"train.steps={steps}", "train.count_flops=false", f"data.streaming={str(streaming).lower()}",
           f"data.volume_size=[{volume},{volume},{volume}]", "data.crop_size=[32,32,32]",
           f"data.cache_dir={out.parent / 'prepared'}", "train.checkpoint_every=1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"pretrain failed ({' '.join(cmd)}):\n{output[-2000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256], help="cohort sizes")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run (batch 8)")
    parser.add_argument("--volume", type=int, default=64, help="side of the prepared volume grid")
    parser.add_argument("--modes", nargs="+", default=["streaming", "memory"], choices=["streaming", "memory"])
    parser.add_argument("--workdir", help="keep the cohorts and runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--docs", help="write the table into this markdown file (between the ssl_rss markers)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        rows = []
        print(f"{'mode':<10} {'subjects':>8} {'peak RSS MiB':>13} {'wall s':>8}")
        for mode in args.modes:
            for n in args.sizes:
                manifest = write_cohort(work / "cohort", n)
                res = run_child(manifest, work / f"{mode}-{n}" / "run", mode == "streaming", args.steps, args.volume)
                rows.append({"mode": mode, "subjects": n, **res})
                print(f"{mode:<10} {n:>8} {res['peak_rss_mib']:>13.0f} {res['wall_s']:>8.1f}", flush=True)
        for mode in args.modes:
            peaks = [r["peak_rss_mib"] for r in rows if r["mode"] == mode]
            print(f"{mode}: peak RSS at {max(args.sizes)} / at {min(args.sizes)} subjects = {peaks[-1] / peaks[0]:.2f}")
        volume_mib = args.volume ** 3 * 4 / 2 ** 20
        print(f"(one volume in memory: {volume_mib:.1f} MiB; {max(args.sizes) - min(args.sizes)} more subjects "
              f"= {volume_mib * (max(args.sizes) - min(args.sizes)):.0f} MiB more if held in memory)")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        if args.docs:
            write_docs(Path(args.docs), rows, args, volume_mib)
    return 0


def write_docs(docs: Path, rows: list[dict], args, volume_mib: float) -> None:
    """The ``ssl_rss`` table of docs/ssl.md: peak RSS per mode and cohort size, and the growth per mode."""
    sys.path.insert(0, str(REPO / "scripts" / "reproduce"))
    from ssl_common import markdown, stamp, write_block

    command = "python scripts/bench_pretrain_rss.py"
    if args.sizes != [16, 64, 256] or args.steps != 5 or args.volume != 64:
        command += f" --sizes {' '.join(map(str, args.sizes))} --steps {args.steps} --volume {args.volume}"
    table = []
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        for r in mine:
            table.append([mode, str(r["subjects"]), f"{r['peak_rss_mib']:.0f}",
                          f"{r['peak_rss_mib'] - mine[0]['peak_rss_mib']:+.0f}"])
    text = (f"`{command} --docs docs/ssl.md` ({stamp()}; rotation_cpu config, {args.steps} steps of batch 8, "
            f"{args.volume}^3 prepared volumes = {volume_mib:.1f} MiB each in memory; peak RSS of the pretrain "
            "process from `wait4`, which does not depend on machine load; a few MiB of noise between runs)\n\n"
            + markdown(["data", "subjects", "peak RSS (MiB)", "vs smallest cohort (MiB)"], table))
    write_block(docs, "ssl_rss", text)


if __name__ == "__main__":
    sys.exit(main())
