"""A caching job stopped by SIGTERM (a scheduler's cancel or time limit) says so in one line, exits
143 and keeps what it committed, like Ctrl-C (exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from slice2vol.cache import FeatureStore
from tests._tiny_encoder import make_tiny_cohort
from tests.test_extract import REPO, _job_command, wait_for_parts


@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGTERM, 143, "terminated (SIGTERM); what was committed is kept: rerun the command to resume"),
    (signal.SIGINT, 130, "interrupted"),
])
def test_a_stopped_job_says_so_and_keeps_its_committed_subjects(tmp_path: Path, sig, code, line) -> None:
    manifest = make_tiny_cohort(tmp_path / "cohort", n=6)
    out = tmp_path / "s.h5"
    env = {**os.environ, "TINY_ENCODER_DELAY": "0.12", "OMP_NUM_THREADS": "1"}
    # a test run started in the background by a non-interactive shell (`make test &`, nohup) passes
    # SIGINT on as ignored, and Python then never raises KeyboardInterrupt: the job ran to the end and
    # exited 0. The job gets the default disposition back, as a terminal's foreground job has it.
    proc = subprocess.Popen(_job_command(manifest, out), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_parts(proc, out.with_name(out.name + ".parts"), 2)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    kept = FeatureStore(out)
    assert len(kept.subjects()) >= 2
    kept.close()
    assert not list(tmp_path.rglob("*.tmp"))
