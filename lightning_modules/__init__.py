"""Model families: what each declares (the ``*_config`` modules: no torch, no Lightning) and the LightningModules
that train the networks of networks/, imported when a run is built (``ModelFamily.implementation``)."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):  # a new *_config file registers its families: nothing else changes
    if _module.name.endswith("_config"):
        importlib.import_module(f"{__name__}.{_module.name}")
