"""Fine-tuning entries of an experiment, fitted inside the folds.

For each training fold a :class:`FoldFinetunedEncoder` fine-tunes the 2D encoder
(:func:`slice2vol.finetune.run_finetune`) on that fold's training subjects only — on the evaluated
label for the ``supervised`` objective — caches the slice features of the fold's training and test
subjects with the fine-tuned weights, and pools them (``aggregator``). The test subjects never shape
the weights that embed them. Runs live in ``<out>/finetune/<name>-<hash>/`` keyed by the fine-tuning
config, the training subjects and the label, so reruns reuse them.
"""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path

import numpy as np

from slice2vol.config import config_hash, from_dict, to_dict
from slice2vol.eval.cohort import safe_name
from slice2vol.eval.experiment import ExperimentConfig, FinetuneEntry, IntegrationError, resolve_weights
from slice2vol.eval.nested import FoldFittedSet
from slice2vol.eval.sets import weights_identity

log = logging.getLogger(__name__)


class FoldFinetunedEncoder(FoldFittedSet):
    """A fine-tuning entry refitted on each training fold (see the module docstring)."""

    def __init__(self, entry: FinetuneEntry, cfg: ExperimentConfig, cohort, base: Path, out: Path, progress: bool,
                 cache=None) -> None:
        try:
            from slice2vol.finetune import FinetuneConfig
        except ImportError as err:
            raise IntegrationError(f"finetune entries need slice2vol.finetune ({err})") from None
        self.ft_cfg = from_dict(FinetuneConfig, dict(entry.finetune), f"finetune.{entry.name}.finetune")
        self.ft_cfg.weights = resolve_weights(self.ft_cfg.weights, base)
        supervised = self.ft_cfg.objective == "supervised"
        what = f"{self.ft_cfg.encoder} fine-tuned ({self.ft_cfg.mode}, {self.ft_cfg.objective}) on each training fold"
        super().__init__(f"{entry.name}/{entry.aggregator}", list(cohort.ids), kind="2d", entry=entry, cache=cache,
                         supervised=supervised, what=what,
                         provenance={"encoder_key": self.ft_cfg.encoder, "weights": self.ft_cfg.weights})
        self.cfg, self.cohort, self.out, self.progress = cfg, cohort, out, progress

    def identity_parts(self) -> dict:
        ft = to_dict(self.ft_cfg)
        ft["weights"] = weights_identity(self.ft_cfg.weights)
        return {"finetune": ft, "aggregator": self.entry.aggregator, "slices": to_dict(self.cfg.slices),
                "volume": to_dict(self.cfg.volume), "dtype": self.entry.dtype}

    def fit_embed(self, train_ids, y_train, test_ids, kind, seed, label=None):
        from slice2vol.aggregate import build_aggregator, load_bags
        from slice2vol.extract import cache_cohort
        from slice2vol.finetune import run_finetune

        run_dir = self.out / "finetune" / (f"{safe_name(self.entry.name)}-"
                                           f"{config_hash(self.identity_parts(), sorted(train_ids), label or '')}")
        ckpt = run_dir / "encoder.safetensors"
        if not ckpt.exists():
            ft = copy.deepcopy(self.ft_cfg)
            if self.supervised:
                ft.label = label
                ft.data.train_ids = "all"  # "all" of the training-fold cohort handed over below
            params = inspect.signature(run_finetune).parameters
            if "subject_ids" in params:
                run_finetune(ft, self.cohort, run_dir, volume_cfg=self.cfg.volume, progress=self.progress,
                             subject_ids=list(train_ids))
            else:
                run_finetune(ft, self.cohort.subset(list(train_ids)), run_dir, volume_cfg=self.cfg.volume,
                             progress=self.progress)
        store = run_dir / "features.h5"
        ids = list(train_ids) + list(test_ids)
        report = cache_cohort(self.cohort.subset(ids), self.ft_cfg.encoder, store, weights=str(ckpt),
                              encoder_kwargs=dict(self.ft_cfg.encoder_kwargs), volume_cfg=self.cfg.volume,
                              slice_cfg=self.cfg.slices, batch_size=self.entry.batch_size, device=self.cfg.device,
                              progress=self.progress, seed=self.cfg.seed, dtype=self.entry.dtype)
        if getattr(report, "failures", None):
            raise ValueError(f"{self.name}: caching with the fine-tuned weights failed for "
                             f"{[str(f) for f in report.failures][:3]}")
        agg = build_aggregator(self.entry.aggregator)
        if agg.requires_fit:
            raise ValueError(f"finetune entry {self.entry.name!r}: aggregator must be parameter-free "
                             f"(mean, max, gem), got {self.entry.aggregator!r}")
        _, bags = load_bags(store, ids)
        X = agg.transform(bags).astype(np.float32)
        return X[: len(train_ids)], X[len(train_ids):]
