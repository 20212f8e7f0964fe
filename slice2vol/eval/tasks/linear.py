"""Linear probe task: standardise -> L2 logistic regression or ridge, penalty chosen inside the training fold."""

from __future__ import annotations

from slice2vol.config import to_dict
from slice2vol.eval.linear import LinearProbe
from slice2vol.eval.tasks.base import ProbeTask, TaskContext, align_proba


class LinearTask(ProbeTask):
    name = "linear"

    def options(self, ctx: TaskContext) -> dict:
        options = {"linear": to_dict(ctx.cfg.linear)}
        if ctx.cfg.splits.group:  # inner folds keep groups whole since fuzz round 14: not the old cached numbers
            options["inner_cv"] = "grouped"
        return options

    def primary_variant(self, ctx: TaskContext, kind: str) -> str:
        return "logistic" if kind == "categorical" else "ridge"

    def fit_predict(self, ctx, x_train, y_train, x_test, frame, fold):
        task = "classification" if frame.kind == "categorical" else "regression"
        groups = None
        if ctx.cfg.splits.group:
            # the penalty is chosen on inner folds that keep each group (site, family, a subject's
            # visits) whole, like the outer folds: split groups made the selection optimistic
            # x_train's rows are fold.train's subjects, in that order (SubjectSplits.positions)
            groups = ctx.labels[ctx.cfg.splits.group].reindex(fold.train).astype(str).to_numpy()
        probe = LinearProbe(task, ctx.cfg.linear, seed=ctx.cfg.seed + fold.repeat).fit(x_train, y_train,
                                                                                        groups=groups)
        if task == "classification":
            pred = align_proba(probe.predict_proba(x_test), probe.classes_, frame.classes)
        else:
            pred = probe.predict(x_test)
        return {self.primary_variant(ctx, frame.kind): pred}, {"penalty": float(probe.best_param_)}


TASK = LinearTask()
