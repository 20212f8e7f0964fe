"""Benchmark tasks: one module per task, registered here by module path and imported lazily.

Each module defines ``TASK``, an instance of :class:`slice2vol.eval.tasks.base.Task`. Adding a task
is one new file plus one line below; a module that is not there yet fails only when a config asks
for its task.
"""

from __future__ import annotations

import importlib

#: task name -> module path (the module's ``TASK`` object is the task)
TASKS: dict[str, str] = {
    "knn": "slice2vol.eval.tasks.knn",
    "linear": "slice2vol.eval.tasks.linear",
    "segmentation": "slice2vol.eval.tasks.segmentation",
    "anomaly": "slice2vol.eval.tasks.anomaly",
    "ssl_curve": "slice2vol.eval.tasks.ssl_curve",
}


def get_task(name: str):
    """The ``TASK`` object of a registered task.

    Raises:
        KeyError: unknown task name.
        ImportError: the task is registered but its module is not installed (yet).
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    path = TASKS[name]
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name == path:
            raise ImportError(f"task {name!r} is registered but its module {path} does not exist yet") from None
        raise
    task = getattr(module, "TASK", None)
    if task is None:
        raise ImportError(f"{path} defines no TASK object")
    return task


__all__ = ["TASKS", "get_task"]
