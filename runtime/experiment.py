"""An experiment's parts from its config: the datamodule (its task) and the module that trains its model."""
import lightning as L

from config import Config, ConfigError


def build(cfg: Config) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The datamodule and module of an experiment, chosen by model.name and data.task."""
    if cfg.model.name == "mlp":
        from datamodules.parity import ParityDataModule
        from lightning_modules.parity_mlp import ParityMLP
        return ParityDataModule(cfg), ParityMLP(cfg)
    if cfg.model.name == "next_token" and cfg.data.task == "parity":
        from datamodules.cot import CoTDataModule
        from lightning_modules.next_token import NextTokenModule, make_backbone
        dm = CoTDataModule(cfg)
        backbone = make_backbone(cfg, dm.vocab_size, dm.seq_len)
        return dm, NextTokenModule(cfg, backbone, dm.prompt_len, dm.seq_len, dm.answer_len)
    if cfg.model.name == "next_token" and cfg.data.task == "multiply":
        from datamodules.multiply import MultiplyDataModule
        from lightning_modules.next_token import NextTokenModule, make_backbone
        dm = MultiplyDataModule(cfg)
        backbone = make_backbone(cfg, dm.vocab_size, dm.seq_len)
        return dm, NextTokenModule(cfg, backbone, dm.prompt_len, dm.seq_len, dm.answer_len)
    raise ConfigError(f"model.name: {cfg.model.name!r} with data.task {cfg.data.task!r} is not available")
