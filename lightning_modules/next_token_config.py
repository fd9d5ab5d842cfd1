"""The next-token families' declarations: a model section and checks per kind (lightning_modules/next_token.py
trains them)."""
from dataclasses import dataclass

from config import Config, ModelConfig, need
from lightning_modules.family import ModelFamily, register_model
from lightning_modules.mlp_config import validate_members

POSITIONALS = ("learned", "rope", "none")


@dataclass
class TransformerConfig(ModelConfig):
    name: str = "next_token"
    kind: str = "transformer"
    depth: int = 2  # blocks
    d_model: int = 128
    heads: int = 4
    positional: str = "learned"  # learned | rope | none


@dataclass
class LinearConfig(ModelConfig):
    name: str = "next_token"
    kind: str = "linear"


@dataclass
class NextTokenMLPConfig(ModelConfig):
    name: str = "next_token"
    kind: str = "mlp"
    width: int = 100  # hidden units per position
    depth: int = 2  # hidden layers


class NextTokenFamily(ModelFamily):
    """Any network trained by next-token prediction on a sequence task."""
    format = "sequence"

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        validate_members(cfg)


@register_model("next_token", kind="transformer", default=True)
class TransformerFamily(NextTokenFamily):
    module = "lightning_modules.next_token:TransformerLM"
    Config = TransformerConfig

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        super().validate(cfg, given)
        m = cfg.model
        need(m.positional in POSITIONALS, "model.positional", f"{m.positional!r} is not one of {', '.join(POSITIONALS)}")
        need(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")
        need(m.d_model >= 1, "model.d_model", f"must be >= 1, got {m.d_model}")
        need(m.heads >= 1, "model.heads", f"must be >= 1, got {m.heads}")
        need(m.d_model % m.heads == 0, "model.heads", f"must divide model.d_model ({m.d_model}), got {m.heads}")
        need(m.positional != "rope" or (m.d_model // m.heads) % 2 == 0, "model.positional",
             f"rope needs an even head dim (model.d_model / model.heads), got {m.d_model // m.heads}")


@register_model("next_token", kind="linear")
class LinearFamily(NextTokenFamily):
    module = "lightning_modules.next_token:LinearLM"
    Config = LinearConfig


@register_model("next_token", kind="mlp")
class MLPNextTokenFamily(NextTokenFamily):
    module = "lightning_modules.next_token:MLPLM"
    Config = NextTokenMLPConfig

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        super().validate(cfg, given)
        need(cfg.model.width >= 1, "model.width", f"must be >= 1, got {cfg.model.width}")
        need(cfg.model.depth >= 1, "model.depth", f"must be >= 1, got {cfg.model.depth}")
