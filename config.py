"""Typed run configuration: dataclass schemas, YAML composition, validation and a memory check.

A run's config is composed as: schema defaults <- configs/train.yaml <- configs/trainer/<T>.yaml
<- configs/experiment/<E>.yaml <- command-line dotlist. ``experiment=E`` and ``trainer=T`` on the
command line pick the presets; every other argument is a dotted ``key=value`` override.
"""
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

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


def compose(args: list[str], machine: bool = True) -> Config:
    """The validated config for command-line ``args``; raises ConfigError on bad input.

    ``machine``: also refuse a run too big for the free memory of this machine (check_memory).
    """
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
    if machine:
        check_memory(config)
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


STREAM_IDS = 2**32  # a Philox counter word; member m trains on stream 2m and evaluates on 2m + 1 (datamodules/parity)
SAMPLE_IDS = 2**64  # a sample's index within its stream is 64-bit (kernels/sparse_parity.py)
MAX_DIGITS = 9  # multiply operands fit one 32-bit word and their product int64 (datamodules/multiply.py)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Reject impossible values with one line naming the key."""
    d, o, t = cfg.data, cfg.optim, cfg.trainer

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _need(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")
    _need(0 <= cfg.seed < 2**63, "seed", f"must be in [0, 2**63), got {cfg.seed}")
    _need(d.n >= 1, "data.n", f"must be >= 1, got {d.n}")
    _need(d.k >= 1, "data.k", f"must be >= 1, got {d.k}")
    _need(d.k <= d.n, "data.k", f"must be <= data.n ({d.n}), got {d.k}")
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _need(0.0 <= d.noise < 0.5, "data.noise", f"must be in [0, 0.5), got {d.noise}")  # nan fails too
    if d.secret is not None:
        _need(len(d.secret) == d.k and len(set(d.secret)) == d.k and all(0 <= i < d.n for i in d.secret),
              "data.secret", f"must be {d.k} distinct indices in [0, {d.n}), got {list(d.secret)}")
    if d.task == "multiply":
        _need(1 <= d.digits <= MAX_DIGITS, "data.digits", f"must be in [1, {MAX_DIGITS}], got {d.digits}")
        _need(d.chain in ("none", "sequential"), "data.chain",
              f"the multiply task has chains none and sequential, got {d.chain!r}")
        _need(d.noise == 0, "data.noise", f"the multiply task has no label noise, got {d.noise}")
    _validate_model(cfg)
    _need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a finite number > 0, got {o.lr}")
    _need(math.isfinite(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _need(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
          f"must be a finite number >= 0, got {o.weight_decay}")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip",
          f"must be a finite number >= 0 (0: off), got {o.grad_clip}")
    _need(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    _need(t.max_steps * d.batch_size <= SAMPLE_IDS, "trainer.max_steps",
          f"{t.max_steps} steps of data.batch_size {d.batch_size} exceed the 2**64 sample indices of a stream")
    _need(t.num_nodes >= 1, "trainer.num_nodes", f"must be >= 1, got {t.num_nodes}")
    _need(t.cpu_threads >= 0, "trainer.cpu_threads", f"must be >= 0, got {t.cpu_threads}")
    _need(t.fail_at_step >= 0, "trainer.fail_at_step", f"must be >= 0, got {t.fail_at_step}")
    _need(t.steps_per_batch >= 0, "trainer.steps_per_batch", f"must be >= 0, got {t.steps_per_batch}")
    _need(cfg.eval.every_n_steps >= 1, "eval.every_n_steps", f"must be >= 1, got {cfg.eval.every_n_steps}")
    _need(cfg.eval.size >= 1, "eval.size", f"must be >= 1, got {cfg.eval.size}")
    _need(cfg.eval.size <= SAMPLE_IDS, "eval.size", f"must be <= 2**64 (sample indices), got {cfg.eval.size}")
    _need(cfg.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps",
          f"must be >= 1, got {cfg.checkpoint.every_n_steps}")
    devices = t.devices
    _need(devices == "auto" or (isinstance(devices, int) and devices >= 1) or isinstance(devices, list),
          "trainer.devices", f"must be a count >= 1, a list of ids or 'auto', got {devices!r}")
    world_size = world_size or _world_size(cfg)
    if world_size:
        _need(d.batch_size % world_size == 0, "data.batch_size",
              f"{d.batch_size} is not divisible by the world size {world_size}")
    if t.steps_per_batch:
        for key, every in (("eval.every_n_steps", cfg.eval.every_n_steps),
                           ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps)):
            _need(every % t.steps_per_batch == 0, "trainer.steps_per_batch",
                  f"{t.steps_per_batch} must divide {key} ({every})")


def _validate_model(cfg: Config) -> None:
    """The sizes of the model family ``model.name`` (and its ``model.kind``) that can be built."""
    d, m = cfg.data, cfg.model
    _need(m.width >= 1, "model.width", f"must be >= 1, got {m.width}")
    _need(m.ensemble >= 1, "model.ensemble", f"must be >= 1, got {m.ensemble}")
    _need(m.member_offset >= 0, "model.member_offset", f"must be >= 0, got {m.member_offset}")
    if m.name == "mlp":
        _need(d.task == "parity", "model.name", f"'mlp' learns the parity task only, got data.task {d.task!r}")
        last = STREAM_IDS // 2  # member m's streams 2m and 2m + 1 must be < 2**32
        _need(m.member_offset + m.ensemble <= last, "model.member_offset",
              f"members [{m.member_offset}, {m.member_offset + m.ensemble}) need stream ids up to "
              f"{2 * (m.member_offset + m.ensemble) - 1}, past 2**32 - 1: model.member_offset + model.ensemble "
              f"must be <= 2**31")
        _need(m.power >= 1, "model.power", f"must be >= 1, got {m.power}")
        _need(1 <= m.init_sparsity <= d.n, "model.init_sparsity",
              f"must be in [1, data.n], got {m.init_sparsity}")
        return
    _need(m.ensemble == 1, "model.ensemble", f"next-token models train one member, got {m.ensemble}")
    if m.kind == "transformer":
        _need(m.d_model >= 1, "model.d_model", f"must be >= 1, got {m.d_model}")
        _need(m.heads >= 1, "model.heads", f"must be >= 1, got {m.heads}")
        _need(m.d_model % m.heads == 0, "model.heads", f"must divide model.d_model ({m.d_model}), got {m.heads}")
        _need(m.positional != "rope" or (m.d_model // m.heads) % 2 == 0, "model.positional",
              f"rope needs an even head dim (model.d_model / model.heads), got {m.d_model // m.heads}")
    if m.kind in ("transformer", "mlp"):
        _need(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")


def _need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


# --- will it fit: the largest tensors of a run against the memory where they live ---------------
EVAL_CHUNK = 2048  # held-out prompts per forward pass of a next-token evaluation (lightning_modules/next_token.py)
FLOAT, INDEX = 4, 8  # bytes of a float32 and of an int64 token
PROCESS = 2**29  # the process itself: Python, torch and Lightning (~0.5 GiB resident)


class Term(NamedTuple):
    """A tensor (or a few alike) a run holds: ``bytes_each`` times the product of ``sizes``."""
    what: str
    sizes: list[tuple[str, int, Optional[str]]]  # (shown as, size, config key blamed for it or None)
    bytes_each: int

    @property
    def bytes(self) -> int:
        return math.prod(size for _, size, _ in self.sizes) * self.bytes_each


def seq_len(d: DataConfig) -> int:
    """Tokens of one sequence of a next-token task (the formats of datamodules/cot.py and multiply.py)."""
    if d.task == "multiply":
        t = d.digits
        chain = 2 * t * t + t - 1 + (t - 1) * (2 * t + 1) + 1 if d.chain == "sequential" else 0
        return 4 * t + 2 + chain
    return d.n + 2 + {"none": 0, "sequential": d.k - 1, "tree": max(d.k - 2, 0)}[d.chain]


def footprint(cfg: Config) -> list[Term]:
    """The largest tensors one process of the run holds at once: an estimate meant to err high."""
    d, m, t, e = cfg.data, cfg.model, cfg.trainer, cfg.eval
    world = _world_size(cfg) or 1
    every = math.gcd(e.every_n_steps, cfg.checkpoint.every_n_steps)
    steps = 1 if world > 1 else min(t.steps_per_batch or min(100, every), t.max_steps)
    local = ("data.batch_size", max(1, d.batch_size // world), "data.batch_size")
    per_batch = [("steps per batch", steps, "trainer.steps_per_batch"), local]
    if m.name == "mlp":
        E, n = ("model.ensemble", m.ensemble, "model.ensemble"), ("data.n", d.n, "data.n")
        width = ("model.width", m.width, "model.width")
        terms = [Term("first layer, its initial copy, gradient and optimizer state", [("4", 4, None), E, width, n],
                      FLOAT),
                 Term("held-out set, its generation and the Fourier gap's copy",
                      [("3", 3, None), E, ("eval.size", e.size, "eval.size"), n], FLOAT),
                 Term("training batch", [E, *per_batch, n], FLOAT),
                 Term("hidden activations and their gradient", [("2", 2, None), E, local, width], FLOAT)]
        sampled = math.comb(d.n, d.k) > 2048 if d.n <= 2048 else d.k < d.n  # C(n, k) >= n for 0 < k < n
        if sampled:  # the Fourier gap's random k-subsets: rand + argsort (hidden_progress.py)
            terms.append(Term("Fourier-gap subset draws", [("4096", 4096, None), n], FLOAT + INDEX))
        elif d.n <= 16 and e.hidden_progress:  # its exact transform over the whole boolean cube
            terms.append(Term("outputs on the boolean cube", [E, ("2**data.n", 2**d.n, "data.n")], 2 * FLOAT))
        return terms
    T = ("seq_len", seq_len(d), "data.digits" if d.task == "multiply" else "data.n")
    vocab = ("vocab", 15 if d.task == "multiply" else 3, None)
    chunk = ("eval chunk", min(EVAL_CHUNK, e.size), "eval.size")
    terms = [Term("held-out set", [("eval.size", e.size, "eval.size"), T], INDEX),
             Term("training batch", [*per_batch, T], INDEX)]
    if m.kind == "transformer":
        depth, D = ("model.depth", m.depth, "model.depth"), ("model.d_model", m.d_model, "model.d_model")
        return terms + [Term("weights, gradients and Adam state", [("4 x 12", 48, None), depth, D, D], FLOAT),
                        Term("activations kept for the backward pass", [("16", 16, None), local, T, depth, D], FLOAT),
                        Term("evaluation pass: KV cache and activations",
                             [("2 x model.depth + 12", 2 * m.depth + 12, "model.depth"), chunk, T, D], FLOAT)]
    out = vocab if m.kind == "linear" else ("model.width", m.width, "model.width")
    terms += [Term("CausalLinear blocks, gradient and Adam state", [("2", 2, None), T, T, vocab, out], FLOAT),
              Term("assembled CausalLinear matrix, its gradient and the generation cache's copy",
                   [("3", 3, None), T, T, vocab, out], FLOAT),
              Term("evaluation pass: prefix sums and activations", [("5", 5, None), chunk, T, out], FLOAT)]
    if m.kind == "mlp":
        depth = ("model.depth", m.depth, "model.depth")
        terms.append(Term("hidden activations", [("2", 2, None), local, T, out, depth], FLOAT))
    return terms


def check_memory(cfg: Config) -> None:
    """Refuse a run whose estimated largest tensors exceed the free memory of its device (or host)."""
    free = available_memory(cfg)
    if free is None:
        return
    available, where = free
    terms = footprint(cfg)
    processes = _local_processes(cfg) if where.startswith("host") else 1
    total = processes * (PROCESS + sum(term.bytes for term in terms))
    if total <= available:
        return
    worst = max(terms, key=lambda term: term.bytes)
    key = max((k for _, _, k in worst.sizes if k), key=lambda k: _growth(cfg, k))
    sizes = " x ".join(f"{name}={size}" if name[0].isalpha() else name for name, size, _ in worst.sizes)
    times = f"{processes} processes on this host; " if processes > 1 else ""
    raise ConfigError(f"{key}: the run needs about {_gib(total)} ({times}largest: {worst.what}, {sizes} x "
                      f"{worst.bytes_each} bytes = {_gib(worst.bytes)}), more than the {_gib(available)} of {where}")


def available_memory(cfg: Config) -> Optional[tuple[int, str]]:
    """(free bytes, where) of the memory the run's tensors live in; None where that cannot be told.

    CUDA runs: the device's free memory (torch.cuda.mem_get_info), if CUDA is available; CPU runs (and
    ``auto`` without CUDA): MemAvailable of /proc/meminfo, else the available pages of os.sysconf.
    """
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda", "auto"):
        import torch
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            devices = cfg.trainer.devices
            index = devices[index] if isinstance(devices, list) and index < len(devices) else index
            if not isinstance(index, int) or not 0 <= index < torch.cuda.device_count():
                return None
            return torch.cuda.mem_get_info(index)[0], f"free memory of cuda:{index}"
        if accelerator != "auto":
            return None
    elif accelerator != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024, "host memory available (MemAvailable)"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory available (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None


def _world_size(cfg: Config) -> Optional[int]:
    devices = cfg.trainer.devices
    if devices == "auto":
        return None
    return (devices if isinstance(devices, int) else len(devices)) * cfg.trainer.num_nodes


def _local_processes(cfg: Config) -> int:
    """Processes of the run on this host (each holds its own copy of the tensors)."""
    devices = cfg.trainer.devices
    return devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1


def _growth(cfg: Config, key: str) -> float:
    """How many times its schema default a size key is (which key made a tensor too big)."""
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    return getattr(getattr(cfg, section), name) / max(default, 1)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
