"""Every key an experiment accepts acts, and every key that does not apply is refused.

The walk: for each distinct schema the presets compose to, every accepted key is given another value
(chosen from the key's own type and, for choices, from the error a wrong value draws) and a tiny run is
probed: the first training batch, the held-out set, the initial and trained weights and the results.
Each key must change one of them, be refused for that value, select the schema (task, model, optimizer),
or be a run option documented as not touching training (runtime/checkpointing.RUN_OPTIONS).
"""
import functools
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from config import CONFIG_DIR, ConfigError, compose, leaves
from datamodules.circuit_config import program
from datamodules.stream import Ticket
from runtime.checkpointing import RUN_OPTIONS
from runtime.experiment import build

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
SELECTORS = {"experiment", "data.task", "model.name", "model.kind", "optim.name"}  # they pick the schema itself
PREREQUISITES = {"model.power": ["model.activation=poly"], "model.init_sparsity": ["model.init=sparse"]}
TINY = {"trainer.max_steps": 4, "eval.every_n_steps": 2, "checkpoint.every_n_steps": 2, "eval.size": 64,
        "model.width": 8, "model.d_model": 32, "data.batch_size": 8, "optim.warmup_steps": 1}  # where a schema has it


def accepted(cfg) -> dict:
    """The preset's accepted keys with their values."""
    node = OmegaConf.structured(cfg)
    return {key: OmegaConf.select(node, key) for key in leaves(node)}


def schemas() -> dict[tuple, str]:
    """One preset per distinct schema (the set of accepted keys)."""
    found: dict[tuple, str] = {}
    for preset in PRESETS:
        found.setdefault(tuple(sorted(accepted(compose([f"experiment={preset}"])))), preset)
    return found


def tiny(preset: str, extra: list[str]) -> list[str]:
    keys = accepted(compose([f"experiment={preset}"]))
    return [f"experiment={preset}", "trainer=cpu", *(f"{k}={v}" for k, v in TINY.items() if k in keys), *extra]


def choices(args: list[str], key: str) -> list[str]:
    """The values a choice key takes, as its refusal of a wrong one lists them."""
    with pytest.raises(ConfigError) as err:
        compose([*args, f"{key}=not_a_choice"])
    listed = re.search(r"is not one of (.+)$", str(err.value))
    assert listed, f"{key}: a wrong value must be refused with the list of its choices, got {err.value}"
    return [c.strip() for c in listed.group(1).split(",")]


def alternative(args: list[str], key: str, value):
    """Another valid-looking value of ``key``."""
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, str):
        return next(c for c in choices(args, key) if c != value)
    if isinstance(value, int):
        return max(1, 2 * value)
    if isinstance(value, float):
        return value / 1000 if value else 0.1  # small enough that a gradient clip bites
    if value is None and key == "data.train_size":  # a finite training set of two batches
        return str(2 * compose(args).data.batch_size)
    if value is None and key == "data.secret":
        k = compose(args).data.k
        return "[" + ",".join(map(str, range(k))) + "]"
    if value is None and key == "data.outputs":  # all of them, by default: the first alone
        return f"[{program(compose(args).data).outputs[0]}]"
    raise AssertionError(f"{key}: no alternative for {value!r}")


def probe(args: list[str]) -> list[torch.Tensor]:
    """What a key may change: the first training batch, the held-out set, weights before and after training."""
    cfg = compose(args)
    torch.manual_seed(cfg.seed)
    dm, model = build(cfg)
    cpu = torch.device("cpu")
    batch = dm.generate(Ticket(0, 1, 0, 1), cpu)
    held_out = dm.eval_set(cpu)
    seen = [t.float() for t in (batch if isinstance(batch, tuple) else [batch])[:-1]]
    seen += [t.float() for t in (held_out if isinstance(held_out, tuple) else [held_out])]
    seen += [t.detach().clone().float() for t in model.state_dict().values()]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return seen + [t.detach().clone().float() for t in model.state_dict().values()]


def differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))


@functools.cache
def walk(preset: str) -> dict[str, str]:
    """Every key the walk visited in the preset's schema, with what it found: a selector, a run option, refused
    (for the alternative value), acts, or inert."""
    baselines: dict[tuple, list[torch.Tensor]] = {}
    return {key: verdict(preset, key, baselines) for key in accepted(compose(tiny(preset, [])))}


def verdict(preset: str, key: str, baselines: dict[tuple, list[torch.Tensor]]) -> str:
    """What giving ``key`` another value does in the preset's tiny run (``baselines``: probes of unchanged runs)."""
    if key in SELECTORS or key in RUN_OPTIONS:
        return "selector" if key in SELECTORS else "run option"
    args = tiny(preset, PREREQUISITES.get(key, []))
    value = accepted(compose(args))[key]
    changed = [*args, f"{key}={alternative(args, key, value)}"]
    try:
        compose(changed)
    except ConfigError:
        return "refused"  # for that value: it cannot silently do nothing
    base = baselines.setdefault(tuple(args), probe(args))
    return "acts" if differs(base, probe(changed)) else f"inert: {changed[-1]}"


WALK = pytest.mark.xdist_group("walk")  # under pytest -n, one worker walks and checks what was walked


@WALK
@pytest.mark.parametrize("preset", sorted(schemas().values()))
def test_every_accepted_key_acts_or_is_refused(preset):
    inert = [found[len("inert: "):] for found in walk(preset).values() if found.startswith("inert")]
    assert not inert, f"{preset}: accepted keys that change nothing: {', '.join(inert)}"


def unwalked(walked: Callable[[str], Iterable[str]]) -> list[str]:
    """'preset: key' for every key a preset accepts that no walk of a preset with the same schema visited
    (the expected keys come from composing every preset, not from the walk or its choice of presets)."""
    schema = {preset: frozenset(accepted(compose([f"experiment={preset}"]))) for preset in PRESETS}
    visited = {(schema[preset], key) for preset in schemas().values() for key in walked(preset)}
    return [f"{preset}: {key}" for preset in PRESETS for key in sorted(schema[preset])
            if (schema[preset], key) not in visited]


@WALK
def test_every_key_of_every_preset_was_walked():
    missing = unwalked(walk)
    assert not missing, f"accepted keys the walk never tried: {', '.join(missing)}"
    skipped = unwalked(lambda preset: set(walk(preset)) - {"optim.lr"})  # what this check reports a skip as
    assert skipped and all(line.endswith(": optim.lr") for line in skipped), skipped


REFUSED = [  # (arguments, the message the refusal must start with)
    ("data.chain=sequential", "data.chain: does not apply to the parity task with model mlp"),
    ("model.heads=2", "model.heads: does not apply to model mlp"),
    ("model.kind=linear", "model.kind: does not apply to model mlp"),
    ("data.digits=3", "data.digits: does not apply to the parity task with model mlp"),
    ("data.task=multiply", "data.task: the multiply task has no classifier format for model mlp"),
    ("optim.name=adam optim.momentum=0.9", "optim.momentum: does not apply to optim.name=adam"),
    ("model.power=3", "model.power: applies to model.activation=poly only"),
    ("model.init_sparsity=3", "model.init_sparsity: applies to model.init=sparse only"),
    ("experiment=multiply_cot data.n=20", "data.n: does not apply to the multiply task with model next_token/mlp"),
    ("experiment=multiply_cot data.noise=0.1", "data.noise: does not apply to the multiply task"),
    ("experiment=multiply_cot data.secret=[0]", "data.secret: does not apply to the multiply task"),
    ("experiment=cot_parity model.width=10", "model.width: does not apply to model next_token/transformer"),
    ("experiment=cot_parity model.kind=linear model.depth=3", "model.depth: does not apply to model next_token/linear"),
    ("experiment=cot_parity model.activation=sin", "model.activation: does not apply to model next_token/transformer"),
    ("experiment=cot_parity eval.hidden_progress=false", "eval.hidden_progress: does not apply to model next_token"),
    ("experiment=cot_parity kernels.compile=true", "kernels.compile: does not apply to model next_token"),
    ("experiment=cot_parity model.grad=autograd", "model.grad: does not apply to model next_token"),
    ("model.nonsense=1", "model.nonsense: unknown key"),
    ("model.name=next_token model.kind=rnn", "model.kind: 'rnn' is not one of linear, mlp, transformer"),
    ("data.task=sorting", "data.task: unknown task 'sorting'"),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[a for a, _ in REFUSED])
def test_inapplicable_keys_are_refused_naming_them(args, message):
    with pytest.raises(ConfigError) as err:
        compose(args.split())
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("args", [["experiment=cot_parity", "model.kind=linear"], ["experiment=cot_parity", "model.kind=mlp"],
                                  ["experiment=multiply_cot", "model.kind=transformer"],
                                  ["experiment=multiply_cot", "model.kind=linear"]])
def test_switching_the_family_drops_the_presets_keys_of_the_other(args):
    cfg = compose(args)
    assert cfg.model.kind == args[1].split("=")[1]
    assert not hasattr(cfg.model, "heads") or cfg.model.kind == "transformer"


def test_train_refuses_an_inapplicable_key_with_exit_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "data.chain=sequential", f"run_dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.chain: does not apply to the parity task with model mlp"
    assert not run_dir.exists()
