"""The ``anomaly`` task: PatchCore-style detection of simulated lesions with every 2D encoder, its
random-init twin and the raw-intensity positive control; pixel, region, slice and subject levels,
the paired subject design and a contrast x radius difficulty sweep.

The work is done by :func:`slice2vol.eval.dense_tasks.run_anomaly`; see :mod:`slice2vol.eval.anomaly`
for the scorer and :mod:`slice2vol.eval.lesions` for the lesion simulation.
"""

from __future__ import annotations

from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult


class AnomalyTask(Task):
    name = "anomaly"

    def run(self, ctx: TaskContext) -> TaskResult:
        from slice2vol.eval.dense_tasks import run_anomaly

        out = run_anomaly(ctx)
        return TaskResult(rows=out["rows"], paired=out["paired"], figures=out["figures"], extras=out["extras"],
                          skipped=out["skipped"])


TASK = AnomalyTask()
