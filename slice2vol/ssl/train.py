"""Entry point kept for callers that pretrain from a manifest path (e.g. the experiment runner).

``pretrain(cfg, manifest, out_dir)`` = load the manifest, then :func:`slice2vol.ssl.trainer.pretrain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from slice2vol.ssl.config import SSLConfig
from slice2vol.ssl.trainer import TrainResult
from slice2vol.ssl.trainer import pretrain as _pretrain


def pretrain(cfg: SSLConfig, manifest: str | Path, out_dir: str | Path, *, resume: bool = True,
             progress: bool = True, subject_ids: Sequence[str] | None = None) -> TrainResult:
    """Pretrains ``cfg`` on the subjects of a CSV manifest into ``out_dir`` (resuming from ``out_dir/last``).

    Args:
        subject_ids: pretrain on these subjects of the manifest only (e.g. a benchmark's training
            folds); recorded in ``meta.json``; a resume on another subject set is refused.
    """
    from slice2vol.data.manifest import load_manifest

    return _pretrain(cfg, out_dir, cohort=load_manifest(manifest), resume=resume, progress=progress,
                     subject_ids=subject_ids)
