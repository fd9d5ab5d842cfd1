"""Tasks: counter-based infinite streams, one registered task per pair of files.

Importing this package registers every task's declarations (the ``*_config`` modules: no torch, no Lightning);
a task's DataModule is imported when a run is built (``Problem.implementation``).
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):  # a new *_config file registers its task: nothing else changes
    if _module.name.endswith("_config"):
        importlib.import_module(f"{__name__}.{_module.name}")
