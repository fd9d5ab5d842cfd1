"""An experiment's parts from its config: the task's datamodule and the module that trains its model."""
import lightning as L

from config import Config
from datamodules import task_class
from lightning_modules import model_family


def build(cfg: Config) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The datamodule of ``data.task`` and the module of the model family, through their registries."""
    task = task_class(cfg.data.task)(cfg)
    return task, model_family(cfg.model).build(cfg, task)
