"""scripts/torchrun_pretrain.sh on CPU: two gloo processes started by torchrun, then a resumed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_script_trains_with_two_processes_and_resumes(blob_manifest, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "method": "simclr", "backbone": {"name": "cnn", "params": {"width": 8, "num_stages": 3}},
        "method_params": {"proj_hidden": 32, "proj_dim": 16},
        "data": {"volume_size": [32, 32, 32], "crop_size": [24, 24, 24]},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 1}}))
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SLURM_JOB_ID", None)
    out = tmp_path / "run"
    cmd = ["bash", str(REPO / "scripts" / "torchrun_pretrain.sh"), "--config", str(config), "--manifest",
           str(blob_manifest), "--out", str(out), "--device", "cpu"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    meta = json.loads((out / "last" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2 and meta["subject_ids"] == ["s0", "s1", "s2"]
    assert "2/2 steps" in first.stdout and "on 2 process(es)" in first.stdout
    again = subprocess.run(cmd + ["train.steps=3"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((out / "last" / "meta.json").read_text())["step"] == 3
    history = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3]
    assert "resuming" in (out / "slice2vol.log").read_text()
