"""k-NN probe task (DINO protocol) on every volume-embedding set: several k, weighted and majority votes.

Features are centred with the training fold's mean (``knn.center``, default on) and L2-normalised;
see :mod:`slice2vol.eval.knn` for why centring makes the weighted vote mean the same for every encoder.
"""

from __future__ import annotations

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.knn import KNNProbe
from slice2vol.eval.tasks.base import ProbeTask, TaskContext, TaskResult, align_proba


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
        used = used_ks(ctx.cfg.knn.ks, frame)
        knn = KNNProbe(sorted(set(used.values())), ctx.cfg.knn.temperature, task,
                       center=ctx.cfg.knn.center).fit(x_train, y_train)
        out: dict[str, np.ndarray] = {}
        for (k, vote), pred in knn.predict(x_test).items():
            if task == "classification":
                pred = align_proba(pred, knn.classes_, frame.classes)
            for k_req in (r for r, used_k in used.items() if used_k == k):  # the configured names; run() lists
                out[f"k={k_req} {vote}"] = pred                              # the k used
        return out, {}

    def run(self, ctx: TaskContext) -> TaskResult:
        result = super().run(ctx)
        for label, frame in ctx.frames.items():
            for k_req, k in used_ks(ctx.cfg.knn.ks, frame).items():
                if k != k_req:  # clipped: k is the smallest training fold's size
                    result.skipped.append({
                        "name": f"knn k={k_req} ({label})",
                        "reason": f"k is larger than the smallest training fold ({k} subjects)",
                        "substitute": f"k={k} in every fold, shown under the name k={k_req}"})
        return result


def smallest_training_fold(frame) -> int:
    """Subjects in the smallest training fold of a label's splits."""
    return min(len(fold.train) for fold in frame.splits.folds)


def used_ks(ks, frame) -> dict[int, int]:
    """Configured k -> the k used in every fold of the label: clipped to its smallest training fold,
    so one variant is the same k-NN in every fold (clipping per fold would mix k=37 and k=38)."""
    smallest = smallest_training_fold(frame)
    return {int(k): min(int(k), smallest) for k in ks}

TASK = KNNTask()
