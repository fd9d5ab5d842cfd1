"""The MLP ensemble family's declarations: its model section, the eval and kernels keys only it uses, and their
checks (lightning_modules/parity_mlp.py trains it)."""
from dataclasses import dataclass

from config import Config, EvalConfig, KernelsConfig, ModelConfig, need, task_class
from lightning_modules.family import ModelFamily, register_model

ACTIVATIONS = ("relu", "sin", "poly")
INITS = ("uniform", "gaussian", "sign", "sparse")
STREAM_IDS = 2**32  # a Philox counter word; member m trains on stream 2m and evaluates on 2m + 1
CHOICES = {"activation": ACTIVATIONS, "init": INITS,
           "loss": ("hinge", "square", "logistic"), "grad": ("auto", "autograd")}


@dataclass
class MLPConfig(ModelConfig):
    width: int = 100
    activation: str = "relu"  # relu | sin | poly
    power: int = 2  # exponent of the poly activation z**power
    init: str = "uniform"  # uniform (Xavier) | gaussian (Kaiming) | sign | sparse
    init_sparsity: int = 2  # nonzero inputs per neuron for init=sparse
    loss: str = "hinge"  # hinge | square | logistic
    grad: str = "auto"  # auto: an accelerated step where it computes autograd's update | autograd: always autograd


@dataclass
class MLPEvalConfig(EvalConfig):
    hidden_progress: bool = True  # log the hidden-progress measures (margin, Fourier gap, drift) at each eval


@dataclass
class MLPKernelsConfig(KernelsConfig):
    compile: bool = False  # CPU: data generation and the ReLU/hinge SGD step as C++ (built once, ~40 s; cached)


def validate_members(cfg: Config) -> None:
    """model.ensemble and model.member_offset: members m use streams 2m and 2m + 1, which must be < 2**32."""
    m = cfg.model
    need(m.ensemble >= 1, "model.ensemble", f"must be >= 1, got {m.ensemble}")
    need(m.member_offset >= 0, "model.member_offset", f"must be >= 0, got {m.member_offset}")
    need(m.member_offset + m.ensemble <= STREAM_IDS // 2, "model.member_offset",
         f"members [{m.member_offset}, {m.member_offset + m.ensemble}) need stream ids up to "
         f"{2 * (m.member_offset + m.ensemble) - 1}, past 2**32 - 1: model.member_offset + model.ensemble "
         f"must be <= 2**31")


@register_model("mlp")
class MLPFamily(ModelFamily):
    module = "lightning_modules.parity_mlp:ParityMLP"
    format = "classifier"
    Config = MLPConfig
    sections = {"eval": MLPEvalConfig, "kernels": MLPKernelsConfig}

    @classmethod
    def sections_for(cls, task) -> dict[str, type]:
        """eval.hidden_progress only where the task declares the hidden-progress measures."""
        return cls.sections if task.hidden_progress else {"kernels": MLPKernelsConfig}

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        m, task = cfg.model, task_class(cfg.data.task)
        for key, allowed in CHOICES.items():
            need(getattr(m, key) in allowed, f"model.{key}", f"{getattr(m, key)!r} is not one of {', '.join(allowed)}")
        need(m.width >= 1, "model.width", f"must be >= 1, got {m.width}")
        need(not task.regression or m.loss == "square", "model.loss",
             f"the {task.name} task is a regression target: it needs square, got {m.loss}")
        validate_members(cfg)
        need(m.power >= 1, "model.power", f"must be >= 1, got {m.power}")
        need("model.power" not in given or m.activation == "poly", "model.power",
             f"applies to model.activation=poly only, got model.activation={m.activation}")
        inputs = task.input_size(cfg.data)
        need(1 <= m.init_sparsity <= inputs, "model.init_sparsity",
             f"must be in [1, {inputs}] (the task's inputs), got {m.init_sparsity}")
        need("model.init_sparsity" not in given or m.init == "sparse", "model.init_sparsity",
             f"applies to model.init=sparse only, got model.init={m.init}")
