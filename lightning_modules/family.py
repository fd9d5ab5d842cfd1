"""A model family: what it declares (this class, read when a command line is checked) and the LightningModule
that trains its network (imported only when a run is built).

To add a model, declare a ``ModelFamily`` subclass with ``@register_model("name")`` (or
``register_model("name", kind=...)`` for one architecture of a family selected by ``model.kind``) in a
``*_config.py`` file of this package, and write its LightningModule, deriving from that class, in another;
``module`` names it. docs/extending.md walks through it. Nothing here imports torch or Lightning.
"""
import math
from typing import Any, ClassVar, NamedTuple, Optional

from config import DEFAULT_KINDS, MODELS, Config, ModelConfig, load_class

FLOAT, INDEX = 4, 8  # bytes of a float32 and of an int64 token


class Term(NamedTuple):
    """A tensor (or a few alike) a run holds: ``bytes_each`` times the product of ``sizes`` (runtime/memory.py)."""
    what: str
    sizes: list[tuple[str, int, Optional[str]]]  # (shown as, size, config key blamed for it or None)
    bytes_each: int

    @property
    def bytes(self) -> int:
        return math.prod(size for _, size, _ in self.sizes) * self.bytes_each


def register_model(name: str, kind: Optional[str] = None, default: bool = False):
    """Class decorator: the model ``model.name=name`` (and ``model.kind=kind``)."""
    def register(cls: type["ModelFamily"]) -> type["ModelFamily"]:
        cls.key = name if kind is None else f"{name}/{kind}"
        MODELS[cls.key] = cls
        if default:
            DEFAULT_KINDS[name] = kind
        return cls
    return register


class ModelFamily:
    """The class-level interface of a model family (its LightningModule derives from it)."""

    key: ClassVar[str]
    module: ClassVar[str]  # "package.module:Class", the LightningModule that trains the family's network
    format: ClassVar[str]  # the batch format it trains on: classifier | sequence (datamodules/problem.py)
    Config: ClassVar[type[ModelConfig]]  # its model section: must default name (and kind) to its registered key
    sections: ClassVar[dict[str, type]] = {}  # extended shared sections, e.g. {"eval": ...}: keys only it uses

    @classmethod
    def sections_for(cls, task) -> dict[str, type]:
        """The extended sections a run on ``task`` (a registered Problem) has: keys that do not apply to a task
        are left out, so they are refused there."""
        return cls.sections

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        """Refuse impossible values of the family's keys; ``given``: keys set on the command line."""

    @classmethod
    def implementation(cls) -> type:
        """The LightningModule class named by ``module``."""
        return load_class(cls.module)

    # --- what the LightningModule defines -------------------------------------------------------
    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        """The largest tensors a process holds (runtime/memory.py)."""
        return []

    @classmethod
    def build(cls, cfg: Config, task):
        """The module for ``cfg``, trained on ``task`` (a datamodules.Task)."""
        return cls(cfg)

    def measure(self, task):
        """The held-out evaluation of the current weights on this module's device (what evaluate(step) records)."""
        raise NotImplementedError

    def metrics(self, measured) -> dict[str, Any]:
        """The summary.json fields of a ``measure`` result (final_accuracy, ...)."""
        raise NotImplementedError

    def fit_metrics(self, task) -> dict[str, Any]:
        """A finite training set's fit of the current weights, measured again: summary.json's final_train_<score>
        (what eval.py records beside ``metrics``)."""
        raise NotImplementedError

    def summary_fields(self) -> dict[str, Any]:
        """summary.json fields that name the model (besides its results)."""
        return {}

    def hparam_fields(self) -> dict[str, Any]:
        """TensorBoard hparams of the model (scalars and strings only)."""
        return {}
