"""The task and model contract holds for parts nobody here wrote: a classifier task with neither ``n`` nor ``k``
trains through the MLP family, a sequence task through every next-token family, and a family that cannot
take a task is refused in one line."""
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import config
from config import Config, ConfigError, DataConfig, compose, need
from datamodules.problem import Problem, SequenceLayout
from datamodules.task import Task
from kernels import sparse_parity
from runtime.run_dirs import RUN_DIR_ENV
from runtime.training import train

FAST = ["trainer=cpu", "trainer.progress_bar=false", "eval.size=256", "checkpoint.every_n_steps=100",
        "eval.every_n_steps=50"]


@dataclass
class HalfspaceConfig(DataConfig):
    task: str = "halfspace"
    inputs: int = 12  # +/-1 coordinates per sample
    weights: list[int] = (3, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, 0)  # the label is sign(weights . x): no ties


class HalfspaceProblem(Problem):
    """A weighted vote of +/-1 inputs: neither parity's n nor its k, nor a secret."""
    datamodule = "test_contract:HalfspaceTask"
    size_key = "data.inputs"
    configs = {"classifier": HalfspaceConfig}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        need(len(cfg.data.weights) == cfg.data.inputs and sum(cfg.data.weights) % 2 == 1, "data.weights",
             f"must be {cfg.data.inputs} integers with an odd sum")

    @classmethod
    def input_size(cls, data: HalfspaceConfig) -> int:
        return data.inputs


class HalfspaceTask(HalfspaceProblem, Task):
    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        d = self.cfg.data
        x, _, _ = sparse_parity(self.cfg.seed, start, count, d.inputs, [0], stream=streams, device=device,
                                layout="pm1")
        return x, (x @ torch.tensor(d.weights, dtype=x.dtype, device=device)).sign()


@dataclass
class ReverseConfig(DataConfig):
    format: ClassVar[str] = "sequence"
    task: str = "reverse"
    length: int = 5  # bits to write back in reverse order


class ReverseProblem(Problem):
    """Bits, a separator, the same bits reversed: every answer token copies one prompt position."""
    datamodule = "test_contract:ReverseTask"
    size_key = "data.length"
    configs = {"sequence": ReverseConfig}

    @classmethod
    def layout(cls, data: ReverseConfig) -> SequenceLayout:
        return SequenceLayout(3, data.length + 1, 2 * data.length + 1, data.length)


class ReverseTask(ReverseProblem, Task):
    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        length = self.cfg.data.length
        bits, _, _ = sparse_parity(self.cfg.seed, start, count, length, [0], stream=stream, device=device)
        bits = bits.long()
        return torch.cat([bits, torch.full((count, 1), 2, device=device), bits.flip(1)], dim=1)


@pytest.fixture
def registered(monkeypatch):
    """The two tasks registered as a new file of datamodules/ would register them, for this test only."""
    for name, problem in (("halfspace", HalfspaceProblem), ("reverse", ReverseProblem)):
        monkeypatch.setitem(config.TASKS, name, problem)
        monkeypatch.setattr(problem, "name", name, raising=False)
    monkeypatch.setenv(RUN_DIR_ENV, "")  # train() passes its run directory on to Lightning's ranks through it:
    monkeypatch.delenv(RUN_DIR_ENV)  # unset for the test, and as it was afterwards


def summary(tmp_path, args: list[str]) -> dict:
    cfg = compose([*args, f"run_dir={tmp_path / 'run'}"])
    assert train(cfg) == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_classifier_task_without_n_or_k_trains_through_the_mlp(registered, tmp_path, capsys):
    cfg = compose(["data.task=halfspace"])
    assert not hasattr(cfg.data, "n") and not hasattr(cfg.eval, "hidden_progress")
    done = summary(tmp_path, ["data.task=halfspace", "data.inputs=12", "model.width=32", "trainer.max_steps=2000",
                              *FAST])
    assert done["task"] == "halfspace" and done["secret"] is None and done["final_accuracy"] == 1.0
    assert done["solved_step"] is not None and "run_dir" in capsys.readouterr().out


def test_keys_of_other_tasks_and_measures_it_does_not_declare_are_refused(registered):
    for key, why in (("data.n=10", "data.n: does not apply to the halfspace task with model mlp"),
                     ("eval.hidden_progress=true", "eval.hidden_progress: does not apply to the halfspace task with "
                                                   "model mlp"),
                     ("model.init_sparsity=13", "model.init_sparsity: must be in [1, 12] (the task's inputs)")):
        with pytest.raises(ConfigError, match=f"^{key.split('=')[0]}: ") as err:
            compose(["data.task=halfspace", "model.init=sparse", key])
        assert str(err.value).startswith(why), err.value


@pytest.mark.parametrize("kind, args", [
    ("linear", ["optim.lr=0.05"]),
    ("mlp", ["model.width=64", "optim.lr=0.01"]),
    ("transformer", ["model.d_model=32", "model.heads=2", "optim.lr=0.003"]),
])
def test_a_sequence_task_trains_through_every_next_token_family(registered, tmp_path, kind, args):
    done = summary(tmp_path, ["data.task=reverse", "model.name=next_token", f"model.kind={kind}", "optim.name=adamw",
                              "optim.weight_decay=0", "data.batch_size=64", "trainer.max_steps=1500", *args, *FAST])
    assert done["task"] == "reverse" and done["model"] == f"next_token/{kind}"
    assert done["greedy_accuracy"] == 1.0 and done["solved_step"] is not None, done


def test_a_family_that_cannot_take_a_task_is_refused_in_one_line(registered):
    with pytest.raises(ConfigError, match=r"^data\.task: the halfspace task has no sequence format for model "
                                          r"next_token/transformer \(it serves classifier models\)$"):
        compose(["data.task=halfspace", "model.name=next_token"])
    with pytest.raises(ConfigError, match=r"^data\.task: the reverse task has no classifier format for model mlp "):
        compose(["data.task=reverse", "model.name=mlp"])
