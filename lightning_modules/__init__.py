"""Model families: the LightningModules that train the networks of networks/, one registered class each."""
import importlib
import pkgutil

from lightning_modules.family import MODELS, ModelFamily, model_family, register_model  # noqa: F401

for _module in pkgutil.iter_modules(__path__):  # each module registers its families: a new file is all it takes
    importlib.import_module(f"{__name__}.{_module.name}")
