"""Typed run configuration: dataclass schemas, YAML composition, validation and a memory check.

A run's config is composed as: schema defaults <- configs/train.yaml <- configs/trainer/<T>.yaml
<- configs/experiment/<E>.yaml <- command-line dotlist. ``experiment=E`` and ``trainer=T`` on the
command line pick the presets; every other argument is a dotted ``key=value`` override.

The schema is assembled per run: the ``data`` section is the dataclass its task declares for the
batch format its model family takes (datamodules/), the ``model`` section (and any ``eval`` or
``kernels`` extension) is the model family's (lightning_modules/), the ``optim`` section is the
optimizer's. An experiment accepts exactly those keys. Tasks and families put their declarations in
``TASKS`` and ``MODELS`` when their packages are imported; this module imports neither package, nor
torch or Lightning, so a bad command line is refused before they load. A preset's key that belongs to another
task, family or optimizer is dropped, so ``experiment=cot_parity model.kind=linear`` works; the
same key given on the command line is refused, naming it.
"""
import importlib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("experiment", "trainer")


@dataclass
class DataConfig:
    """What every task's section holds; a task's dataclass adds its own keys (datamodules/)."""
    format: ClassVar[str] = "classifier"  # the batch format the section serves: classifier | sequence
    task: str = "parity"
    batch_size: int = 32  # global: ranks split it
    train_size: Optional[int] = None  # None: fresh samples forever; N: samples [0, N) of each member's training
    # stream, one pass per epoch in an order that is a pure function of (seed, member, epoch) (datamodules/stream.py)


@dataclass
class ModelConfig:
    """What every model family's section holds; a family's dataclass adds its own keys (lightning_modules/)."""
    name: str = "mlp"
    ensemble: int = 1  # members trained at once, each its own init and data streams
    member_offset: int = 0  # members are [offset, offset + ensemble): member m alone == member m in a group


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup from 0
    schedule: str = "constant"  # constant | cosine (decay to 10% over trainer.max_steps)
    grad_clip: float = 0.0  # clip each member's gradient norm to this; 0: off


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.0


@dataclass
class AdamConfig(OptimConfig):
    name: str = "adam"  # adam (L2 weight decay) | adamw (decoupled)
    lr: float = 0.001


OPTIMIZERS: dict[str, type[OptimConfig]] = {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig}


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    steps_per_batch: int = 0  # SGD steps per Lightning batch; 0 = chosen to fit the schedule (datamodules/stream.py)
    progress_bar: bool = True
    cpu_threads: int = 1  # torch intra-op threads; small models run fastest on one, 0 = torch's default


@dataclass
class EvalConfig:
    every_n_steps: int = 500
    size: int = 8192  # held-out samples per member; solved = 100% on them


@dataclass
class CheckpointConfig:
    every_n_steps: int = 5000


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | triton | torch


@dataclass
class Config:
    experiment: str = MISSING
    seed: int = 0
    run_dir: Optional[str] = None  # default: runs/<experiment>/<time>-<seed>, unique
    resume: Optional[str] = None  # checkpoint path, or auto: run_dir's last.ckpt if there is one
    resume_force: bool = False  # resume a checkpoint of another experiment, n, k, seed or secret
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=SGDConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and the problem."""


TASKS: dict[str, type] = {}  # data.task -> the task's declarations (datamodules/problem.py: Problem)
MODELS: dict[str, type] = {}  # model.name, or name/kind -> the family's declarations (lightning_modules/family.py)
DEFAULT_KINDS: dict[str, str] = {}  # model.name -> the kind it means when model.kind is not given


def load_class(path: str) -> type:
    """The class a registered part names as ``"package.module:Class"`` (imported now, not when it registered)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def task_class(name: str) -> type:
    """The registered task ``data.task=name``."""
    if name not in TASKS:
        raise ConfigError(f"data.task: unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def model_family(model: Any) -> type:
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


CHOICES = {
    "optim.schedule": ("constant", "cosine"),
    "kernels.backend": ("auto", "triton", "torch"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),  # what the project runs and tests on
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "ddp_fork"),  # data parallel: the stream shards exactly
}


def compose(args: list[str]) -> Config:
    """The validated config for command-line ``args``; raises ConfigError on bad input. Whether the run fits
    this machine is runtime/memory.py's check."""
    groups, dotlist = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r}: expected key=value")
        (groups.__setitem__(key, value) if key in GROUPS else dotlist.append(arg))
    try:
        base = OmegaConf.load(CONFIG_DIR / "train.yaml")
        groups = {**base.pop("defaults", {}), **groups}
        presets = [("configs/train.yaml", base)]
        presets += [(f"configs/{group}/{groups[group]}.yaml", _preset(group, groups[group])) for group in GROUPS[::-1]]
        given = from_dotlist(dotlist)
        raw = OmegaConf.merge(*(layer for _, layer in presets), given)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    schema = schema_for(raw)
    cfg = OmegaConf.structured(schema)
    known = known_keys()
    for where, layer in presets:
        for key in leaves(layer):
            if not has_key(cfg, key) and key in known:  # a key of another task, family or optimizer
                parent, _, name = key.rpartition(".")
                del OmegaConf.select(layer, parent)[name]
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{where}: {_one_line(err)}") from None
    for key in leaves(given):
        if not has_key(cfg, key):
            raise ConfigError(f"{key}: {'does not apply to ' + describe(schema, key) if key in known else 'unknown key'}")
    try:
        cfg = OmegaConf.merge(cfg, given)
        cfg.experiment = groups["experiment"]
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(config, given=set(leaves(given)))
    return config


def from_dotlist(dotlist: list[str]) -> DictConfig:
    """The command line's ``key=value`` overrides. Refused, naming the key: an empty value (most often a shell
    variable that was not set; ``key=null`` means none) and one YAML cannot read as plain data (a ``!!python/...``
    tag: nothing of it runs, the safe loader refuses it; an unquoted ``[E[0]]``)."""
    given = OmegaConf.create()
    for arg in dotlist:
        key, _, value = arg.partition("=")
        if not value.strip():
            raise ConfigError(f"{key}: empty value ({key}=null means none)")
        try:
            given.merge_with_dotlist([arg])
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            hint = "" if isinstance(err, yaml.constructor.ConstructorError) else \
                f"; quote a value that holds brackets or commas, e.g. {key}=['a[0]']"
            raise ConfigError(f"{key}: {value!r} is not a plain YAML value ({problem}){hint}") from None
    return given


def schema_for(raw: DictConfig) -> Config:
    """The run's schema: the sections its task, model family and optimizer declare, at their defaults."""
    if not TASKS or not MODELS:
        raise RuntimeError("no task or model family registered: import datamodules and lightning_modules first")
    task = task_class(OmegaConf.select(raw, "data.task", default="parity"))
    family = model_family(raw.get("model") or {})
    if family.format not in task.configs:
        raise ConfigError(f"data.task: the {task.name} task has no {family.format} format for model "
                          f"{family.key} (it serves {', '.join(task.configs)} models)")
    name = OmegaConf.select(raw, "optim.name", default="sgd")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: {name!r} is not one of {', '.join(OPTIMIZERS)}")
    sections = {"data": task.configs[family.format](), "model": family.Config(), "optim": OPTIMIZERS[name](name=name)}
    return Config(**sections, **{section: cls() for section, cls in family.sections_for(task).items()})


def known_keys() -> set[str]:
    """Every key some task, model family or optimizer declares."""
    classes = [("data", c) for task in TASKS.values() for c in task.configs.values()]
    classes += [("model", family.Config) for family in MODELS.values()]
    classes += [(section, c) for family in MODELS.values() for section, c in family.sections.items()]
    classes += [("optim", c) for c in OPTIMIZERS.values()]
    keys = {f"{section}.{f.name}" for section, c in classes for f in fields(c)}
    return keys | set(leaves(OmegaConf.structured(Config)))


def describe(schema: Config, key: str) -> str:
    """Whom a key of another section's schema does not apply to (for the refusal)."""
    section = key.split(".")[0]
    family, task = model_family(schema.model), task_class(schema.data.task)
    if section == "data" or (section in family.sections and section not in family.sections_for(task)):
        return f"the {task.name} task with model {family.key}"
    if section == "optim":
        return f"optim.name={schema.optim.name}"
    return f"model {family.key}"


def leaves(node: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys of a config's leaves (a list value is a leaf)."""
    keys = []
    for key in node.keys():
        value = node._get_node(key) if isinstance(node, DictConfig) else node[key]
        child = f"{prefix}{key}"
        keys += leaves(value, child + ".") if isinstance(value, DictConfig) and not value._is_none() else [child]
    return keys


def has_key(cfg: DictConfig, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


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


NAME_MAX = 255  # bytes in one file name: the limit of Linux file systems
SAMPLE_IDS = 2**64  # a sample's index within its stream is 64-bit (kernels/sparse_parity.py)


def validate(cfg: Config, world_size: Optional[int] = None, given: set[str] = frozenset()) -> None:
    """Reject impossible values with one line naming the key: the shared keys here, the task's and the model
    family's keys by their own checks. ``given``: the keys set on the command line."""
    d, o, t = cfg.data, cfg.optim, cfg.trainer
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        need(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")
    need(0 <= cfg.seed < 2**63, "seed", f"must be in [0, 2**63), got {cfg.seed}")
    for key in ("run_dir", "resume"):
        for part in Path(getattr(cfg, key) or "").parts:
            size = len(os.fsencode(part))
            need(size <= NAME_MAX, key, f"{part[:24]}... is a name of {size} bytes; file systems allow {NAME_MAX}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    task_class(d.task).validate(cfg)
    if d.train_size is not None:
        validate_train_size(cfg)
    model_family(cfg.model).validate(cfg, given)
    need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a finite number > 0, got {o.lr}")
    if isinstance(o, SGDConfig):
        need(math.isfinite(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    need(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
         f"must be a finite number >= 0, got {o.weight_decay}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip",
         f"must be a finite number >= 0 (0: off), got {o.grad_clip}")
    need(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.max_steps * d.batch_size <= SAMPLE_IDS, "trainer.max_steps",
         f"{t.max_steps} steps of data.batch_size {d.batch_size} exceed the 2**64 sample indices of a stream")
    need(t.num_nodes >= 1, "trainer.num_nodes", f"must be >= 1, got {t.num_nodes}")
    need(t.cpu_threads >= 0, "trainer.cpu_threads", f"must be >= 0, got {t.cpu_threads}")
    need(t.steps_per_batch >= 0, "trainer.steps_per_batch", f"must be >= 0, got {t.steps_per_batch}")
    need(cfg.eval.every_n_steps >= 1, "eval.every_n_steps", f"must be >= 1, got {cfg.eval.every_n_steps}")
    need(cfg.eval.size >= 1, "eval.size", f"must be >= 1, got {cfg.eval.size}")
    need(cfg.eval.size <= SAMPLE_IDS, "eval.size", f"must be <= 2**64 (sample indices), got {cfg.eval.size}")
    need(cfg.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps",
         f"must be >= 1, got {cfg.checkpoint.every_n_steps}")
    devices = t.devices
    need(devices == "auto" or (isinstance(devices, int) and devices >= 1) or isinstance(devices, list),
         "trainer.devices", f"must be a count >= 1, a list of ids or 'auto', got {devices!r}")
    need(not isinstance(devices, list) or len(set(devices)) == len(devices), "trainer.devices",
         f"{devices} names a device more than once")
    world_size = world_size or requested_world_size(cfg)
    if world_size:
        need(d.batch_size % world_size == 0, "data.batch_size",
             f"{d.batch_size} is not divisible by the world size {world_size}")
    if t.steps_per_batch:
        for key, every in (("eval.every_n_steps", cfg.eval.every_n_steps),
                           ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps)):
            need(every % t.steps_per_batch == 0, "trainer.steps_per_batch",
                 f"{t.steps_per_batch} must divide {key} ({every})")


TRAIN_SIZE_MAX = 2**62  # kernels/permutation.py: the epoch order's Feistel halves stay within int64


def validate_train_size(cfg: Config) -> None:
    """A finite training set holds at least a batch, fits the permutation and has no more samples than the task
    has distinct inputs."""
    d, task = cfg.data, task_class(cfg.data.task)
    size, space = d.train_size, task.input_space(d)
    need(size >= d.batch_size, "data.train_size",
         f"{size} is smaller than data.batch_size {d.batch_size} (a batch would hold a sample twice)")
    need(size <= TRAIN_SIZE_MAX, "data.train_size", f"{size} is beyond the 2**62 samples a training set may take "
         "from its stream (leave it unset to stream fresh samples)")
    if space is not None and size > space:
        setting = f"{task.size_key}={getattr(d, task.size_key.split('.')[1])}"
        need(False, "data.train_size", f"{size} exceeds the {space} distinct inputs of the {d.task} task with "
             f"{setting} (a set that large would repeat inputs)")


def need(ok: bool, key: str, problem: str) -> None:
    """Raise ConfigError "key: problem" unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def requested_world_size(cfg: Config) -> Optional[int]:
    """The processes the trainer section asks for, devices x nodes (None for devices=auto)."""
    devices = cfg.trainer.devices
    if devices == "auto":
        return None
    return (devices if isinstance(devices, int) else len(devices)) * cfg.trainer.num_nodes


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
