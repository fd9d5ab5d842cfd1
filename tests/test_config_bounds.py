"""config.validate and runtime.memory.check_memory: values that cannot work are refused, one line naming the key."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datamodules  # noqa: F401  (registers every task's declarations: compose below)
import lightning_modules  # noqa: F401  (and every model family's)
from config import CONFIG_DIR, ConfigError, compose, task_class
from runtime import memory
from runtime.memory import footprint

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
COT = "experiment=cot_parity"

BAD = [  # (arguments, the key the error must name)
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=1e400", "optim.lr"),
    ("optim.weight_decay=inf", "optim.weight_decay"), ("optim.weight_decay=nan", "optim.weight_decay"),
    ("optim.momentum=nan", "optim.momentum"), ("optim.momentum=1", "optim.momentum"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.grad_clip=inf", "optim.grad_clip"),
    ("optim.grad_clip=nan", "optim.grad_clip"), ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("data.noise=nan", "data.noise"), ("data.noise=inf", "data.noise"),
    ("model.member_offset=2147483647 model.ensemble=2", "model.member_offset"),
    ("model.member_offset=4294967296", "model.member_offset"),
    ("trainer.max_steps=1000000000000000000000", "trainer.max_steps"),
    ("eval.size=100000000000000000000", "eval.size"),
    ("experiment=multiply_cot data.digits=0", "data.digits"), ("experiment=multiply_cot data.digits=10", "data.digits"),
    ("experiment=multiply_cot data.chain=tree", "data.chain"), ("experiment=multiply_cot data.noise=0.1", "data.noise"),
    ("data.task=multiply", "data.task"),
    (f"{COT} model.d_model=0", "model.d_model"), (f"{COT} model.d_model=-8", "model.d_model"),
    (f"{COT} model.heads=0", "model.heads"), (f"{COT} model.heads=5", "model.heads"),
    (f"{COT} model.depth=0", "model.depth"), (f"{COT} model.kind=mlp model.depth=0", "model.depth"),
    (f"{COT} model.kind=mlp model.width=0", "model.width"),
    (f"{COT} model.positional=rope model.d_model=12 model.heads=4", "model.positional"),
    (f"{COT} model.ensemble=0", "model.ensemble"), (f"{COT} model.member_offset=-1", "model.member_offset"),
]


@pytest.mark.parametrize("args, key", BAD, ids=[a for a, _ in BAD])
def test_impossible_values_name_their_key(args, key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: ") as err:
        compose(args.split())
    assert "\n" not in str(err.value)


def test_member_streams_bound_is_exact():
    """The last member the bound admits draws from stream 2**32 - 1; one more is refused, naming the bound."""
    from datamodules.parity import ParityTask
    from datamodules.stream import eval_stream
    cfg = compose(["data.n=8", "data.k=2", "eval.size=4", "model.member_offset=2147483647"])
    assert eval_stream(cfg.model.member_offset) == 2**32 - 1
    x, _ = ParityTask(cfg).eval_set(torch.device("cpu"))
    assert x.shape == (1, 4, 8)
    with pytest.raises(ConfigError, match=r"model\.member_offset \+ model\.ensemble must be <= 2\*\*31"):
        compose(["model.member_offset=2147483640", "model.ensemble=9"])


SIZES = [  # (arguments, the key the error must name): far past any machine's memory
    ("data.n=1000000000", "data.n"), ("eval.size=10000000000", "eval.size"),
    ("data.batch_size=10000000000", "data.batch_size"), ("model.width=10000000000", "model.width"),
    ("model.ensemble=100000000", "model.ensemble"),
    ("trainer.max_steps=1000000000 trainer.steps_per_batch=1000000000 eval.every_n_steps=1000000000 "
     "checkpoint.every_n_steps=1000000000", "trainer.steps_per_batch"),
    (f"{COT} data.n=1000000", "data.n"), (f"{COT} model.d_model=10000000", "model.d_model"),
    (f"{COT} model.depth=100000000", "model.depth"), (f"{COT} model.kind=linear data.n=1000000", "data.n"),
    (f"{COT} model.kind=mlp model.width=100000000", "model.width"),
]


@pytest.mark.parametrize("args, key", SIZES, ids=[a for a, _ in SIZES])
def test_sizes_past_the_memory_are_refused_with_the_estimate(monkeypatch, args, key):
    monkeypatch.setattr(memory, "available_memory", lambda cfg: (64 * 2**30, "test memory"))
    cfg = compose(args.split())  # a config for another machine (sweep --slurm) is not measured by compose
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: the run needs about ") as err:
        memory.check_memory(cfg)
    assert "more than the 64.0 GiB of test memory" in str(err.value) and "\n" not in str(err.value)


def test_cpu_processes_on_one_host_each_count(monkeypatch):
    args = ["trainer.accelerator=cpu", "data.n=200", "model.width=100000", "eval.size=1024"]
    one = memory.PROCESS + sum(t.bytes for t in footprint(compose(args)))
    monkeypatch.setattr(memory, "available_memory", lambda cfg: (int(1.5 * one), "host memory of the test"))
    memory.check_memory(compose(args))
    with pytest.raises(ConfigError, match=r"^model\.width: .*\(2 processes on this host; "):
        memory.check_memory(compose([*args, "trainer.devices=2", "trainer.strategy=ddp"]))


def test_host_memory_is_read_where_the_run_is_on_a_cpu():
    free, where = memory.available_memory(compose(["trainer.accelerator=cpu"]))
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    assert "MemAvailable" in where
    assert abs(free - int(meminfo["MemAvailable"].split()[0]) * 1024) < 2**30  # it moves while we look
    if not torch.cuda.is_available():
        assert memory.available_memory(compose(["trainer.accelerator=gpu"])) is None


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("trainer", ["default", "cpu"])
def test_every_preset_is_accepted_and_small(preset, trainer):
    cfg = compose([f"experiment={preset}", f"trainer={trainer}"])
    assert sum(t.bytes for t in footprint(cfg)) < 2**30  # fits any machine the project runs on


@pytest.mark.parametrize("args", [
    [COT], [COT, "data.chain=none"], [COT, "data.chain=tree"], [COT, "data.k=1", "data.chain=tree"],
    [COT, "data.n=5", "data.k=2", "data.chain=tree"],
    *[["experiment=multiply_cot", f"data.digits={d}", f"data.chain={c}"] for d in (1, 2, 5, 9)
      for c in ("none", "sequential", "malach", "malach_joined")]])
def test_the_layout_the_memory_check_uses_is_the_generated_one(args):
    from datamodules.stream import Ticket
    cfg = compose(args)
    task = task_class(cfg.data.task).implementation()
    tokens = task(cfg).generate(Ticket(0, 1, 0, 1), torch.device("cpu")).tokens
    assert tokens.shape[-1] == task.layout(cfg.data).seq_len


@pytest.mark.parametrize("args, key", [
    ([COT, "model.d_model=0"], "model.d_model"),
    (["data.n=1000000000"], "data.n"),  # drew its secret for minutes before it ran out of memory
])
def test_train_py_exits_2_with_one_line_and_writes_nothing(tmp_path, args, key):
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer.accelerator=cpu", *args]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}: "), done.stderr
    assert not (tmp_path / "runs").exists()
