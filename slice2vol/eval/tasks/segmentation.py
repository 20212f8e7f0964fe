"""The ``segmentation`` task: dense linear probe of every 2D encoder, its random-init twin and the
raw-intensity control; every slice predicted, Dice and HD95 per structure on the original grid.

The work is done by :func:`slice2vol.eval.dense_tasks.run_segmentation` (sets, feature files,
cross-validation, rows, paired tests, figures); see :mod:`slice2vol.eval.segmentation` for the probe.
"""

from __future__ import annotations

from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult


class SegmentationTask(Task):
    name = "segmentation"

    def run(self, ctx: TaskContext) -> TaskResult:
        from slice2vol.eval.dense_tasks import run_segmentation

        out = run_segmentation(ctx)
        return TaskResult(rows=out["rows"], paired=out["paired"], figures=out["figures"], extras=out["extras"],
                          skipped=out["skipped"])


TASK = SegmentationTask()
