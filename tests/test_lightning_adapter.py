"""Lightning's private step counters, as lightning_modules/lightning_adapter.py uses them: fails loudly if Lightning changes."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.lightning_adapter import batches_that_stepped, set_default_root_dir, step_counter

STEPS_PER_BATCH = 3


class SeveralStepsPerBatch(L.LightningModule):
    """Takes STEPS_PER_BATCH optimizer steps per batch, counted through the adapter."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        counter = step_counter(opt)
        self.seen.append(self.trainer.global_step)
        for _ in range(STEPS_PER_BATCH - 1):
            self.weight.grad = torch.ones(1)
            counter.before()
            opt.optimizer.step()
            counter.after()
        counter.before()  # a step taken elsewhere (a CUDA graph's replay), counted afterwards
        counter.after()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(range(100), batch_size=1)


def test_lightning_counts_every_step_the_adapter_reports(tmp_path):
    model = SeveralStepsPerBatch()
    trainer = L.Trainer(accelerator="cpu", max_steps=10, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model)
    # max_steps is checked between batches: 4 batches of 3 steps reach 12 >= 10
    assert trainer.global_step == 12 and batches_that_stepped(trainer) == 4
    assert model.seen == [0, 3, 6, 9]
    assert model.weight.item() == -8.0  # the optimizer ran 2 of every 3 counted steps
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 12


def test_an_optimizer_wrapper_without_the_counters_is_a_loud_error():
    with pytest.raises(RuntimeError, match=r"lightning .*: LightningOptimizer has no _on_before_step"):
        step_counter(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_a_trainer_takes_its_run_directory_after_construction(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    set_default_root_dir(trainer, tmp_path / "run")
    assert trainer.default_root_dir == str(tmp_path / "run")
