"""A model family: one registered LightningModule class that owns its config section and network.

To add a model, write a LightningModule that also derives from ``ModelFamily`` and decorate it with
``@register_model("name")`` (or ``register_model("name", kind=...)`` for one architecture of a family
selected by ``model.kind``); docs/extending.md walks through it. train.py, eval.py, the summary and the
memory check reach models only through this interface.
"""
from typing import Any, ClassVar, Optional

from config import Config, ConfigError, ModelConfig, Term

MODELS: dict[str, type["ModelFamily"]] = {}
DEFAULT_KINDS: dict[str, str] = {}  # model.name -> the kind it means when model.kind is not given


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
    """The class-level interface of a model family (mixed into its LightningModule)."""

    key: ClassVar[str]
    format: ClassVar[str]  # the batch format it trains on: classifier | sequence (datamodules/task.py)
    Config: ClassVar[type[ModelConfig]]
    sections: ClassVar[dict[str, type]] = {}  # extended shared sections, e.g. {"eval": ...}: keys only it uses

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        """Refuse impossible values of the family's keys; ``given``: keys set on the command line."""

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        """The largest tensors a process holds (config.check_memory)."""
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

    def summary_fields(self) -> dict[str, Any]:
        """summary.json fields that name the model (besides its results)."""
        return {}

    def hparam_fields(self) -> dict[str, Any]:
        """TensorBoard hparams of the model (scalars and strings only)."""
        return {}


def model_family(model: Any) -> type[ModelFamily]:
    """The family of a ``model`` section (dataclass, DictConfig or dict): model.name, then model.kind."""
    get = model.get if hasattr(model, "get") else lambda key, default=None: getattr(model, key, default)
    name = get("name", "mlp")
    if name in DEFAULT_KINDS:
        kind = get("kind", None) or DEFAULT_KINDS[name]
        kinds = sorted(key.split("/", 1)[1] for key in MODELS if key.startswith(f"{name}/"))
        if f"{name}/{kind}" not in MODELS:
            raise ConfigError(f"model.kind: {kind!r} is not one of {', '.join(kinds)}")
        return MODELS[f"{name}/{kind}"]
    if name not in MODELS:
        names = sorted({key.split("/")[0] for key in MODELS})
        raise ConfigError(f"model.name: {name!r} is not one of {', '.join(names)}")
    return MODELS[name]

