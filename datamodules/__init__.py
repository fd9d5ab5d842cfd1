"""Tasks: counter-based infinite streams, one registered class per ``data.task``."""
import importlib
import pkgutil

from datamodules.task import TASKS, SequenceLayout, Task, register_task, task_class  # noqa: F401

for _module in pkgutil.iter_modules(__path__):  # each module registers its task: a new file is all it takes
    importlib.import_module(f"{__name__}.{_module.name}")
