"""Typed run configuration: dataclass schemas, YAML composition and validation.

A run's config is composed as: schema defaults <- configs/train.yaml <- configs/trainer/<T>.yaml
<- configs/experiment/<E>.yaml <- command-line dotlist. ``experiment=E`` and ``trainer=T`` on the
command line pick the presets; every other argument is a dotted ``key=value`` override.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("experiment", "trainer")


@dataclass
class DataConfig:
    n: int = 50
    k: int = 3
    batch_size: int = 32  # global: ranks split it
    noise: float = 0.0
    secret: Optional[list[int]] = None  # default: drawn from the seed
    task: str = "parity"  # parity | multiply (sequence tasks of model.name=next_token)
    chain: str = "none"  # none | sequential | tree: the intermediate steps a sequence task shows
    digits: int = 2  # operand digits of the multiply task


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp (parity classifier) | next_token (autoregressive, architecture = kind)
    kind: str = "transformer"  # next_token architecture: transformer | linear | mlp
    depth: int = 2  # transformer blocks (mlp kind: hidden layers)
    d_model: int = 128
    heads: int = 4
    positional: str = "learned"  # learned | rope | none
    width: int = 100
    ensemble: int = 1
    member_offset: int = 0  # members are [offset, offset + ensemble): member m alone == member m in a group
    activation: str = "relu"  # relu | sin | poly
    power: int = 2  # exponent of the poly activation z**power
    init: str = "uniform"  # uniform (Xavier) | gaussian (Kaiming) | sign | sparse
    init_sparsity: int = 2  # nonzero inputs per neuron for init=sparse
    loss: str = "hinge"  # hinge | square | logistic


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decay to 10% over trainer.max_steps)
    grad_clip: float = 0.0  # 0: off


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    steps_per_batch: int = 0  # SGD steps per Lightning batch; 0 = largest that fits the schedule (<= 100)
    progress_bar: bool = True
    cpu_threads: int = 1  # torch intra-op threads; small models run fastest on one, 0 = torch's default
    fail_at_step: int = 0  # fault drill (resume tests): SIGKILL the process at this step; 0 = off


@dataclass
class EvalConfig:
    every_n_steps: int = 500
    size: int = 8192  # held-out samples per member; solved = 100% on them
    hidden_progress: bool = True  # log the hidden-progress measures (margin, Fourier gap, drift) at each eval


@dataclass
class CheckpointConfig:
    every_n_steps: int = 5000


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | triton | torch
    compile: bool = False  # CPU: data generation and the ReLU/hinge SGD step as C++ (built once, ~40 s; cached)


@dataclass
class Config:
    experiment: str = MISSING
    seed: int = 0
    run_dir: Optional[str] = None  # default: runs/<experiment>/<time>-<seed>, unique
    resume: Optional[str] = None  # checkpoint path, or auto: run_dir's last.ckpt if there is one
    resume_force: bool = False  # resume a checkpoint of another experiment, n, k, seed or secret
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and the problem."""


CHOICES = {
    "data.chain": ("none", "sequential", "tree"),
    "data.task": ("parity", "multiply"),
    "model.name": ("mlp", "next_token"),
    "model.kind": ("transformer", "linear", "mlp"),
    "model.positional": ("learned", "rope", "none"),
    "optim.schedule": ("constant", "cosine"),
    "model.activation": ("relu", "sin", "poly"),
    "model.init": ("uniform", "gaussian", "sign", "sparse"),
    "model.loss": ("hinge", "square", "logistic"),
    "optim.name": ("sgd", "adam", "adamw"),
    "kernels.backend": ("auto", "triton", "torch"),
}


def compose(args: list[str]) -> Config:
    """The validated config for command-line ``args``; raises ConfigError on bad input."""
    groups, dotlist = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r}: expected key=value")
        (groups.__setitem__(key, value) if key in GROUPS else dotlist.append(arg))
    try:
        cfg = OmegaConf.structured(Config)
        base = OmegaConf.load(CONFIG_DIR / "train.yaml")
        groups = {**base.pop("defaults", {}), **groups}
        cfg = OmegaConf.merge(cfg, base)
        for group in ("trainer", "experiment"):
            cfg = OmegaConf.merge(cfg, _preset(group, groups[group]))
        cfg.experiment = groups["experiment"]
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(config)
    return config


def _preset(group: str, name: str) -> DictConfig:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}: unknown preset {name!r} (known: {', '.join(known)})")
    return OmegaConf.load(path)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0].strip()
    return f"{key}: {message}" if key else message


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Reject impossible values with one line naming the key."""
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.trainer

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {problem}")

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        need(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")
    need(0 <= cfg.seed < 2**63, "seed", f"must be in [0, 2**63), got {cfg.seed}")
    need(d.n >= 1, "data.n", f"must be >= 1, got {d.n}")
    need(d.k >= 1, "data.k", f"must be >= 1, got {d.k}")
    need(d.k <= d.n, "data.k", f"must be <= data.n ({d.n}), got {d.k}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    need(0.0 <= d.noise < 0.5, "data.noise", f"must be in [0, 0.5), got {d.noise}")
    if d.secret is not None:
        need(len(d.secret) == d.k and len(set(d.secret)) == d.k and all(0 <= i < d.n for i in d.secret),
             "data.secret", f"must be {d.k} distinct indices in [0, {d.n}), got {list(d.secret)}")
    need(m.width >= 1, "model.width", f"must be >= 1, got {m.width}")
    need(m.ensemble >= 1, "model.ensemble", f"must be >= 1, got {m.ensemble}")
    need(m.member_offset >= 0, "model.member_offset", f"must be >= 0, got {m.member_offset}")
    need(m.power >= 1, "model.power", f"must be >= 1, got {m.power}")
    need(1 <= m.init_sparsity <= d.n, "model.init_sparsity", f"must be in [1, data.n], got {m.init_sparsity}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.num_nodes >= 1, "trainer.num_nodes", f"must be >= 1, got {t.num_nodes}")
    need(t.cpu_threads >= 0, "trainer.cpu_threads", f"must be >= 0, got {t.cpu_threads}")
    need(t.fail_at_step >= 0, "trainer.fail_at_step", f"must be >= 0, got {t.fail_at_step}")
    need(t.steps_per_batch >= 0, "trainer.steps_per_batch", f"must be >= 0, got {t.steps_per_batch}")
    need(cfg.eval.every_n_steps >= 1, "eval.every_n_steps", f"must be >= 1, got {cfg.eval.every_n_steps}")
    need(cfg.eval.size >= 1, "eval.size", f"must be >= 1, got {cfg.eval.size}")
    need(cfg.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps",
         f"must be >= 1, got {cfg.checkpoint.every_n_steps}")
    devices = t.devices
    need(devices == "auto" or (isinstance(devices, int) and devices >= 1) or isinstance(devices, list),
         "trainer.devices", f"must be a count >= 1, a list of ids or 'auto', got {devices!r}")
    if world_size is None and isinstance(devices, (int, list)):
        world_size = (devices if isinstance(devices, int) else len(devices)) * t.num_nodes
    if world_size:
        need(d.batch_size % world_size == 0, "data.batch_size",
             f"{d.batch_size} is not divisible by the world size {world_size}")
    if t.steps_per_batch:
        for key, every in (("eval.every_n_steps", cfg.eval.every_n_steps),
                           ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps)):
            need(every % t.steps_per_batch == 0, "trainer.steps_per_batch",
                 f"{t.steps_per_batch} must divide {key} ({every})")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
