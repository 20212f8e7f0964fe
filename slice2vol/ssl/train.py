"""Entry point kept for callers that pretrain from a manifest path (e.g. the experiment runner).

``pretrain(cfg, manifest, out_dir)`` = load the manifest, then :func:`slice2vol.ssl.trainer.pretrain`.
"""

from __future__ import annotations

from pathlib import Path

from slice2vol.ssl.config import SSLConfig
from slice2vol.ssl.trainer import TrainResult
from slice2vol.ssl.trainer import pretrain as _pretrain


def pretrain(cfg: SSLConfig, manifest: str | Path, out_dir: str | Path, *, resume: bool = True,
             progress: bool = True) -> TrainResult:
    """Pretrains ``cfg`` on the subjects of a CSV manifest into ``out_dir`` (resuming from ``out_dir/last``)."""
    from slice2vol.data.manifest import load_manifest

    return _pretrain(cfg, out_dir, cohort=load_manifest(manifest), resume=resume, progress=progress)
