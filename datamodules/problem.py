"""A task's declarations: its config section, checks and sample layout (read when a command line is checked).

To add a task, declare a ``Problem`` subclass with ``@register_task("name")`` in a ``*_config.py`` file of
this package, and write its DataModule (a ``datamodules.task.Task`` deriving from that class) in another;
``datamodule`` names it. docs/extending.md walks through it. Nothing here imports torch or Lightning.
"""
from dataclasses import dataclass
from typing import ClassVar, Optional

from config import TASKS, Config, DataConfig, load_class


def register_task(name: str):
    """Class decorator: the task ``data.task=name``."""
    def register(cls: type["Problem"]) -> type["Problem"]:
        cls.name = name
        TASKS[name] = cls
        return cls
    return register


@dataclass(frozen=True)
class SequenceLayout:
    """How a sequence task writes a sample: tokens [0, prompt_len) are given, the rest is the completion,
    whose last ``answer_len`` tokens are the answer."""
    vocab_size: int
    prompt_len: int
    seq_len: int
    answer_len: int


class Problem:
    """The class-level interface of a task. ``configs`` maps each batch format the task serves ("classifier":
    inputs and labels; "sequence": prompt, chain and answer tokens) to the dataclass of its ``data`` section."""

    name: ClassVar[str]
    datamodule: ClassVar[str]  # "package.module:Class", the DataModule that makes the samples
    configs: ClassVar[dict[str, type[DataConfig]]]
    size_key: ClassVar[str]  # the key that sizes a sample (blamed when a run would not fit in memory)
    regression: ClassVar[bool] = False  # classifier format: real targets (square loss) instead of +/-1 labels
    score_name: ClassVar[str] = "accuracy"  # what ``score`` measures: summary.json's final_<score_name>
    hidden_progress: ClassVar[bool] = False  # the label is a function of a secret subset of +/-1 inputs: the
    # hidden-progress measures (metrics/hidden_progress.py) apply, and the task's ``secret`` names that subset

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Refuse impossible values of the task's keys (ConfigError naming the key)."""

    @classmethod
    def input_size(cls, data: DataConfig) -> int:
        """Classifier format: input coordinates per sample."""
        raise NotImplementedError

    @classmethod
    def layout(cls, data: DataConfig) -> SequenceLayout:
        """Sequence format: the token layout of a sample."""
        raise NotImplementedError

    @classmethod
    def secret_size(cls, data: DataConfig) -> int:
        """Where ``hidden_progress``: the coordinates of the secret subset the label depends on."""
        raise NotImplementedError

    @classmethod
    def input_space(cls, data: DataConfig) -> Optional[int]:
        """How many distinct inputs a sample can have (a finite training set, ``data.train_size``, may not exceed
        it); None where unknown."""
        return None

    @classmethod
    def step_bytes(cls, cfg: Config) -> int:
        """Bytes of one SGD step's training data, all members: +/-1 floats (the widest form) or int64 tokens."""
        data, members = cfg.data, cfg.model.ensemble
        per_sample = cls.layout(data).seq_len * 8 if data.format == "sequence" else cls.input_size(data) * 4
        return members * data.batch_size * per_sample

    @classmethod
    def implementation(cls) -> type:
        """The DataModule class named by ``datamodule``."""
        return load_class(cls.datamodule)
