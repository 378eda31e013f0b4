"""What a model's output means: multiclass, multilabel, binary or regression; detection or segmentation; zero-shot
prompts or similarity to references.

A task is an object that owns its behaviour (:class:`~camserve.tasks.base.Task`): it reads outputs into
predictions, says which targets and options a request may give and which methods it takes, gives the engine its
head (the scalar each explanation differentiates) and faithfulness its score, explains its batch and shapes its
section of the response. This package is the one place that knows the tasks: code elsewhere asks the task, never
which task it is. Adding a task is a module here, its entry in :data:`TASKS`, its target and its tests
(docs/development.md).
"""

from __future__ import annotations

from camserve.api import OPTIONS, ExplainOptions
from camserve.errors import ClientError
from camserve.tasks.base import Task
from camserve.tasks.classification import CLASSIFIERS
from camserve.tasks.detection import DETECTION
from camserve.tasks.segmentation import SEGMENTATION, predicted_classes, segment_objective, segment_shares
from camserve.tasks.similarity import EMBEDDING, ZERO_SHOT
from camserve.tasks.volume import of_volumes

__all__ = [
    "TASKS",
    "TASK_OPTIONS",
    "Task",
    "check_fit",
    "predicted_classes",
    "segment_objective",
    "segment_shares",
    "serving_task",
    "task_named",
]

TASKS: dict[str, Task] = {task.name: task for task in (*CLASSIFIERS, SEGMENTATION, DETECTION, ZERO_SHOT, EMBEDDING)}
"""Every task, by the name the spec and ``--task`` use."""

TASK_OPTIONS = frozenset().union(*(task.options for task in TASKS.values()))
"""The options that some tasks take and others refuse; every other option fits every task."""


def serving_task(spec, model) -> Task:
    """The task that serves ``model`` as ``spec`` describes it: its own (:meth:`Task.serving`), reading volumes
    for a 3D network (:mod:`camserve.tasks.volume`)."""
    task = task_named(spec.task).serving(model, spec)
    return of_volumes(task) if spec.volume is not None else task


def task_named(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None


def _takers(option: str) -> str:
    """The tasks that take ``option``, in words: a kind of task when all its tasks take it, else the tasks."""
    kinds: dict[str, list[Task]] = {}
    for task in TASKS.values():
        kinds.setdefault(task.kind, []).append(task)
    named = []
    for kind, tasks in kinds.items():
        taking = [task.name for task in tasks if option in task.options]
        named += [kind] if len(taking) == len(tasks) else taking
    return " and ".join(f"{name} models" for name in named)


def check_fit(task: Task, options: ExplainOptions) -> None:
    """Refuse an option that the task does not take, given another value than its default, naming those that do."""
    for option in OPTIONS:
        if option.name in TASK_OPTIONS and option.name not in task.options:
            if getattr(options, option.name) != option.default:
                raise ClientError(
                    "InvalidOption",
                    f"option {option.name} fits only {_takers(option.name)}; this model is a {task.name} model: "
                    "leave it out",
                )
