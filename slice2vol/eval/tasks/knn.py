"""k-NN probe task (DINO protocol) on every volume-embedding set: several k, weighted and majority votes.

Features are centred with the training fold's mean (``knn.center``, default on) and L2-normalised;
see :mod:`slice2vol.eval.knn` for why centring makes the weighted vote mean the same for every encoder.
"""

from __future__ import annotations

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.knn import KNNProbe
from slice2vol.eval.tasks.base import ProbeTask, TaskContext, align_proba


class KNNTask(ProbeTask):
    name = "knn"

    def options(self, ctx: TaskContext) -> dict:
        return {"knn": to_dict(ctx.cfg.knn)}

    def primary_k(self, ctx: TaskContext) -> int:
        return ctx.cfg.primary_k if ctx.cfg.primary_k in ctx.cfg.knn.ks else ctx.cfg.knn.ks[0]

    def primary_variant(self, ctx: TaskContext, kind: str) -> str:
        return f"k={self.primary_k(ctx)} weighted"

    def skip_reason(self, ctx: TaskContext, es) -> str | None:
        if es.kind != "chance" and es.X is not None and es.dim < 2:
            return "k-NN on cosine similarity needs >= 2 feature dimensions (a 1-D feature has only its sign)"
        return None

    def fit_predict(self, ctx, x_train, y_train, x_test, frame, fold):
        task = "classification" if frame.kind == "categorical" else "regression"
        knn = KNNProbe(ctx.cfg.knn.ks, ctx.cfg.knn.temperature, task, center=ctx.cfg.knn.center).fit(x_train, y_train)
        out: dict[str, np.ndarray] = {}
        for (k, vote), pred in knn.predict(x_test).items():
            out[f"k={k} {vote}"] = align_proba(pred, knn.classes_, frame.classes) if task == "classification" else pred
        return out, {}


TASK = KNNTask()
