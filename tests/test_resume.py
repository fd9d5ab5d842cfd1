"""Exact resume: kill -9 and continue to the same bits and the same TensorBoard curves; atomic
checkpoint writes; bad checkpoints refused before training."""
import functools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import ConfigError, compose
from datamodules.parity import ParityTask
from datamodules.stream import TicketStream
from runtime.experiment import build
from runtime.checkpointing import (IDENTITY_KEY, KILL_AT_STEP_ENV, LOGGED_STEP_KEY, AtomicCheckpointIO, ResumeState,
                                   identity_defaults, load_for_resume, resume_path, run_identity)
from lightning_modules.parity_mlp import ParityMLP
from conftest import (ROOT, TIMEOUT, at_once, checkpoint, clean_env, early, finish, one_error_line, start, train,
                      train_all, wait_for)
# Batches of 50 SGD steps (the largest that divides the eval and checkpoint periods); checkpoints at 200
# and 400. The kill at 350 comes after the step-300 (and -350) metrics reached TensorBoard: the resumed run must hide
# them and log them again. Momentum gives the optimizer a state to restore.
RUN = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.max_steps=400", "eval.every_n_steps=50",
       "checkpoint.every_n_steps=200", "optim.momentum=0.9", "eval.size=512"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar as TensorBoard shows it (events a restart orphaned are purged)."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


PLAIN = [arg for arg in RUN if not arg.startswith("optim.momentum")]  # the default optimizer: the fused step
FIRST = {"uninterrupted": RUN, "killed": RUN, "plain": PLAIN, "plain_killed": PLAIN}
KILLED = {"killed", "plain_killed"}  # these SIGKILL themselves at step 350 (the fault drill: never a config key)


def kill_at(step: int) -> dict:
    """The environment of a run that SIGKILLs itself at ``step``."""
    return {**clean_env(), KILL_AT_STEP_ENV: str(step)}


@early
def resume_runs(tmp: Path, jobs: int) -> tuple[dict[str, tuple[Path, subprocess.CompletedProcess]], dict]:
    """The runs the tests resume or compare with (FIRST: name -> (run_dir, result)), then a copy of the
    uninterrupted one refused and forced with each of CHANGES (change -> Changed). A test that changes a
    FIRST run (a killed one, resumed) is its only user; the others copy theirs."""
    done = train_all(tmp, {name: [f"run_dir={tmp / name}", *args] for name, args in FIRST.items()}, jobs,
                     envs={name: kill_at(350) for name in KILLED})
    first = {name: (tmp / name, done[name]) for name in FIRST}
    if done["uninterrupted"].returncode != 0:
        return first, {}  # the uninterrupted fixture reports it
    return first, at_once({name: functools.partial(refused_then_forced, tmp / name, tmp / "uninterrupted", change)
                           for name, change in CHANGES.items()}, jobs)


@pytest.fixture(scope="module")
def first_runs(resume_runs) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    return resume_runs[0]


@pytest.fixture(scope="module")
def uninterrupted(first_runs) -> Path:
    run_dir, done = first_runs["uninterrupted"]
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, first_runs, uninterrupted):
    run_dir, killed = first_runs["killed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint(run_dir)["global_step"] == 200
    assert max(step for step, _ in scalars(run_dir)["train/loss"]) >= 300  # logged past the checkpoint

    resumed = train(tmp_path, f"run_dir={run_dir}", *RUN, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    mine, reference = checkpoint(run_dir), checkpoint(uninterrupted)
    assert mine["global_step"] == reference["global_step"] == 400
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(mine["state_dict"][name], tensor), name  # bitwise
    for state, ref_state in zip(mine["optimizer_states"][0]["state"].values(),
                                reference["optimizer_states"][0]["state"].values()):
        assert torch.equal(state["momentum_buffer"], ref_state["momentum_buffer"])

    curves, reference_curves = scalars(run_dir), scalars(uninterrupted)
    assert curves.keys() == reference_curves.keys()
    for tag, points in curves.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), (tag, steps)  # each step once
        if tag.startswith("perf/"):  # a rate needs two timestamps: a restarted process has none at its first batch
            assert set(steps) <= {step for step, _ in reference_curves[tag]}, (tag, steps)
            continue
        same = all(s == rs and (v == rv or math.isnan(v) and math.isnan(rv))
                   for (s, v), (rs, rv) in zip(points, reference_curves[tag]))
        assert same and len(points) == len(reference_curves[tag]), (tag, points, reference_curves[tag])


def test_a_killed_run_on_the_fused_plain_sgd_path_resumes_bitwise(tmp_path, first_runs):
    """The default optimizer (plain SGD) trains on the fused step, which keeps no optimizer state of its own."""
    (whole, done), (run_dir, killed) = first_runs["plain"], first_runs["plain_killed"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((whole / "summary.json").read_text())["train_path"] == "fused"
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint(run_dir)["global_step"] == 200
    resumed = train(tmp_path, f"run_dir={run_dir}", *PLAIN, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    mine, reference = checkpoint(run_dir), checkpoint(whole)
    assert mine["global_step"] == reference["global_step"] == 400
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(mine["state_dict"][name], tensor), name


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """The process dies (SIGKILL) with half of the new checkpoint written: last.ckpt is the old one, whole."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import runtime.checkpointing
io, save = runtime.checkpointing.AtomicCheckpointIO(), runtime.checkpointing.write_digested
io.save_checkpoint({{"global_step": 200, "w": torch.arange(1000.)}}, {str(path)!r})
def dying_save(obj, file):
    save(obj, file)
    file.truncate(file.tell() // 2)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
runtime.checkpointing.write_digested = dying_save
io.save_checkpoint({{"global_step": 400, "w": torch.zeros(1000)}}, {str(path)!r})
"""
    done = finish(start([sys.executable, "-c", script], tmp_path))[0]
    assert done.returncode == -signal.SIGKILL, done.stderr
    survivor = torch.load(path, weights_only=True)
    assert survivor["global_step"] == 200 and torch.equal(survivor["w"], torch.arange(1000.))
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # the torn temp file, never read


SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "paritylab",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
# stands in for SLURM's scontrol: records the requeue, then ends the job as SLURM does
SCONTROL = '#!/bin/sh\necho "$@" >> "$(dirname "$0")/requeued"\nkill -9 $PPID\n'


def test_slurm_requeue_signal_then_restart_continues_from_last_checkpoint(tmp_path):
    """scripts/slurm.sbatch's cycle: SIGUSR1 before the time limit, Lightning requeues the job, the job's
    next start (same command, resume=auto, run_dir from the job id) continues from last.ckpt."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "runs" / "parity_mlp" / "slurm-4242"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = {**clean_env(), **SLURM_JOB, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, str(ROOT / "train.py"), "trainer.accelerator=cpu", "trainer.progress_bar=false",
               "eval.every_n_steps=1000", "checkpoint.every_n_steps=1000", "eval.size=256", "resume=auto",
               "data.k=6", "data.batch_size=4096"]  # unsolved, and ~1 s per batch: the signal lands mid-batch
    job = start([*command, "trainer.max_steps=1000000000"], tmp_path, env)
    try:
        wait_for(run_dir / "checkpoints" / "last.ckpt", job, TIMEOUT)
        time.sleep(0.3)  # the checkpointed batch's metrics reach the event file as the next batch starts
        job.send_signal(signal.SIGUSR1)
    except BaseException:
        os.killpg(job.pid, signal.SIGKILL)
        raise
    done = finish(job)[0]
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (bin_dir / "requeued").read_text() == "requeue 4242\n"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]  # no mid-step snapshot
    step = checkpoint(run_dir)["global_step"]
    assert step > 0 and step % 100 == 0

    restart = finish(start([*command, f"trainer.max_steps={step + 200}"], tmp_path, env))[0]
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert checkpoint(run_dir)["global_step"] == step + 200
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == list(range(100, step + 201, 100))  # each step once


# --- refusing what cannot continue this run ------------------------------------------------------------
def test_train_refuses_a_corrupt_checkpoint_with_one_line(tmp_path, uninterrupted):
    torn = tmp_path / "torn.ckpt"
    data = (uninterrupted / "checkpoints" / "last.ckpt").read_bytes()
    torn.write_bytes(data[:len(data) // 2])
    done = train(tmp_path, f"run_dir={tmp_path / 'run'}", *RUN, f"resume={torn}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: resume: {torn} is not a readable checkpoint"), lines
    assert not (tmp_path / "run").exists()


def test_every_rank_refuses_a_checkpoint_of_another_seed(tmp_path, uninterrupted):
    """Two torchrun "nodes" (one rank each) check the checkpoint each on its own, before any training."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(ROOT / "train.py"), f"run_dir={tmp_path / 'run'}", *RUN, "trainer.num_nodes=2", "trainer.strategy=ddp",
            f"resume={uninterrupted / 'checkpoints' / 'last.ckpt'}", "seed=1"]
    nodes = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *args], tmp_path)
             for rank in range(2)]
    for done in finish(*nodes):
        output = done.stdout + done.stderr
        assert "was trained on another problem (checkpoint vs config: seed 0 vs 1; secret" in output, output[-2000:]
        assert "exitcode  : 2" in output, output[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.fixture
def saved(tmp_path) -> tuple[Path, object, ParityMLP]:
    """A checkpoint of a (n=20, k=3, seed 0) ParityMLP, written the way training writes it."""
    cfg = compose(["data.n=20"])
    model = ParityMLP(cfg)
    identity = run_identity(cfg, ParityTask(cfg))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "global_step": 200,
                                          IDENTITY_KEY: identity}, path)
    return path, cfg, model


@pytest.mark.parametrize("change,field", [("seed=3", "seed"), ("data.k=4", "k"), ("data.secret=[0,1,2]", "secret"),
                                          ("experiment=parity_mlp_ensemble", "experiment")])
def test_a_checkpoint_of_another_problem_is_refused_unless_forced(saved, change, field):
    path, _, model = saved
    cfg = compose(["data.n=20", change])
    identity = run_identity(cfg, ParityTask(cfg))
    with pytest.raises(ConfigError, match=rf"^resume: .*another problem .*{field} "):
        load_for_resume(path, identity, model)
    checkpoint, changed = load_for_resume(path, identity, model, force=True)
    assert checkpoint["global_step"] == 200 and field in changed


def test_a_checkpoint_from_before_a_key_existed_resumes_at_its_default(tmp_path):
    """data.chain_stride came after checkpoints of chain runs were written: at its default (the old chain) they
    resume; at another value the problem differs and they are refused, naming it."""
    cfg = compose(["experiment=cot_parity", "data.n=12", "data.k=3"])
    identity = run_identity(cfg, ParityTask(cfg))
    old = {key: value for key, value in identity.items() if key != "chain_stride"}
    model = build(cfg)[1]
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "global_step": 7, IDENTITY_KEY: old}, path)
    assert load_for_resume(path, identity, model, defaults=identity_defaults(cfg))[0]["global_step"] == 7
    with pytest.raises(ConfigError, match=r"another problem .*chain_stride None vs 1"):
        load_for_resume(path, identity, model)  # without the defaults a missing key is a difference
    strided = compose(["experiment=cot_parity", "data.n=12", "data.k=3", "data.chain_stride=2"])
    with pytest.raises(ConfigError, match=r"another problem .*chain_stride None vs 2"):
        load_for_resume(path, run_identity(strided, ParityTask(strided)), model, defaults=identity_defaults(strided))


def test_missing_foreign_and_misshapen_checkpoints_are_refused(saved, tmp_path):
    path, cfg, model = saved
    identity = run_identity(cfg, ParityTask(cfg))
    assert load_for_resume(path, identity, model)[0]["global_step"] == 200
    with pytest.raises(ConfigError, match="does not exist"):
        load_for_resume(tmp_path / "nope.ckpt", identity, model)
    with pytest.raises(ConfigError, match="is a directory, not a checkpoint file"):
        load_for_resume(path.parent, identity, model)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 1}, foreign)
    with pytest.raises(ConfigError, match="is not a paritylab checkpoint"):
        load_for_resume(foreign, identity, model)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        load_for_resume(garbage, identity, model)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 1, "x": SimpleNamespace()}, pickled)
    with pytest.raises(ConfigError, match=r"not a file torch can load safely\)$") as refused:
        load_for_resume(pickled, identity, model)
    assert "weights_only" not in str(refused.value)
    wider = ParityMLP(compose(["data.n=20", "model.width=50"]))
    with pytest.raises(ConfigError, match=r"does not fit the model \(net.b1: checkpoint \(1, 100\), model \(1, 50\)"):
        load_for_resume(path, identity, wider, force=True)


def test_resume_auto_takes_the_run_dirs_last_checkpoint(saved, tmp_path):
    path, _, _ = saved
    run_dir = path.parent.parent
    assert resume_path("auto", run_dir) == path
    assert resume_path("auto", tmp_path / "fresh") is None  # nothing to continue: start
    assert resume_path("some/file.ckpt", None) == Path("some/file.ckpt")
    with pytest.raises(ConfigError, match="resume: 'auto' needs run_dir"):
        resume_path("auto", None)


def test_rng_states_come_back_before_the_first_resumed_batch():
    state, checkpoint = ResumeState({}), {}
    trainer = SimpleNamespace(callback_metrics={"step": torch.tensor(200.0)})  # all on_save_checkpoint reads
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state.on_save_checkpoint(trainer, None, checkpoint)
    assert checkpoint[LOGGED_STEP_KEY] == 200
    expected = torch.rand(3), np.random.rand(3), random.random()
    state.on_load_checkpoint(None, None, checkpoint)
    torch.rand(5)  # drawn by loading and building the dataloader
    state.on_train_batch_start(SimpleNamespace(loggers=[]), None, None, 0)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_a_stream_resumed_off_the_batch_grid_rejoins_it():
    """Extending a finished 1050-step run: batches end on multiples of 100 again, where eval and checkpoints are."""
    stream = TicketStream(lambda: 1050, steps_per_batch=100, max_steps=1320, rank=0, world_size=1)
    assert [(t.step, t.steps) for t in stream] == [(1050, 50), (1100, 100), (1200, 100), (1300, 20)]


# --- resuming with other settings ------------------------------------------------------------------------
CHANGES = {"lr": ["optim.lr=0.05"], "adam": ["optim.name=adam", "optim.lr=0.001"], "loss": ["model.loss=square"]}


class Changed(NamedTuple):
    run_dir: Path
    config: str  # its config.yaml before
    after_refusal: str  # and after the refused resume
    refused: subprocess.CompletedProcess
    forced: subprocess.CompletedProcess


def refused_then_forced(tmp: Path, source: Path, change: list[str]) -> Changed:
    """A copy of ``source`` resumed to step 500 with ``change``, first as is, then with resume_force."""
    run_dir = tmp / "run"
    shutil.copytree(source, run_dir)
    config = (run_dir / "config.yaml").read_text()
    run = [arg for arg in RUN if "optim.name=adam" not in change or not arg.startswith("optim.momentum")]
    args = [f"run_dir={run_dir}", *run, "resume=auto", "trainer.max_steps=500", *change]
    refused = train(tmp, *args)
    after_refusal = (run_dir / "config.yaml").read_text()
    return Changed(run_dir, config, after_refusal, refused, train(tmp, *args, "resume_force=true"))


@pytest.fixture(scope="module")
def changed(resume_runs, uninterrupted) -> dict[str, Changed]:
    return resume_runs[1]


@pytest.mark.parametrize("name", CHANGES)
def test_changed_settings_are_refused_unless_forced_and_then_take_effect(changed, name):
    change, (run_dir, config, after_refusal, refused, forced) = CHANGES[name], changed[name]
    if "optim.name=adam" in change:  # Adam has no momentum key: the run's own is refused beside it
        with pytest.raises(ConfigError, match="^optim.momentum: does not apply to optim.name=adam"):
            compose([*RUN, *change])
    line = one_error_line(refused, f"resume: {run_dir / 'checkpoints' / 'last.ckpt'} was trained with other settings")
    assert all(arg.split("=")[0] in line for arg in change), line
    assert after_refusal == config

    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (run_dir / "config-to-step-400.yaml").read_text() == config  # what ran before is kept
    recorded = OmegaConf.load(run_dir / "config.yaml")
    assert all(str(OmegaConf.select(recorded, arg.split("=")[0])) == arg.split("=")[1] for arg in change)
    group = checkpoint(run_dir)["optimizer_states"][0]["param_groups"][0]
    lr = next((float(arg.split("=")[1]) for arg in change if arg.startswith("optim.lr")), 0.1)
    assert group["lr"] == lr and checkpoint(run_dir)["global_step"] == 500
    if "optim.name=adam" in change:
        assert "betas" in group and "momentum" not in group


def test_a_longer_budget_is_not_a_changed_setting(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    done = train(tmp_path, f"run_dir={run_dir}", *RUN, "resume=auto", "trainer.max_steps=450", "eval.size=256")
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint(run_dir)["global_step"] == 450
