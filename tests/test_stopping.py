"""SIGTERM / SIGINT stop a run at the current step with a checkpoint, one line and 128 + signal; the kill drill:
SIGKILL and SIGTERM at random moments, every resume continues bitwise from the newest checkpoint."""
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import checkpoint, early, finish, train, train_process, wait_for

CPU = ["trainer.accelerator=cpu", "trainer.progress_bar=false"]
# Unsolvable within the budget, batches of 100 steps of a few hundredths of a second each (here): a signal lands
# inside a batch.
LONG = [*CPU, "data.k=6", "data.batch_size=16384", "eval.size=256", "eval.every_n_steps=300",
        "checkpoint.every_n_steps=300", "trainer.max_steps=300"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@early
def reference(tmp: Path, jobs: int) -> dict:
    """The checkpoint of the LONG run, uninterrupted."""
    done = train(tmp, f"run_dir={tmp / 'run'}", *LONG)
    assert done.returncode == 0, done.stderr[-2000:]
    return checkpoint(tmp / "run")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_current_step_and_the_resumed_run_is_bitwise_equal(tmp_path, reference, signum):
    run_dir = tmp_path / "run"
    proc = train_process(tmp_path, f"run_dir={run_dir}", *LONG)
    wait_for(run_dir / "tb", proc)  # made just before training starts
    time.sleep(0.5)  # well inside training
    proc.send_signal(signum)
    done = finish(proc)[0]
    assert done.returncode == 128 + signum, done.stderr[-2000:]
    step = checkpoint(run_dir)["global_step"]
    lines = done.stderr.strip().splitlines()
    assert lines == [f"stopped by {signal.Signals(signum).name}: checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} "
                     f"at step {step}; resume=auto continues"], done.stderr[-2000:]
    assert 0 < step < 300 and not (run_dir / "summary.json").exists()

    resumed = train(tmp_path, f"run_dir={run_dir}", *LONG, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(checkpoint(run_dir)["state_dict"], reference["state_dict"])


def kill_repeatedly(cwd: Path, run_dir: Path, args: list[str], kills: int, steps: int) -> int:
    """Start the run (trainer.max_steps=``steps``) ``kills`` times, killing it by SIGKILL and SIGTERM in turn at a
    random moment after its process saved a checkpoint: every restart must continue from the newest checkpoint
    and leave only last.ckpt. Returns how many kills landed inside a checkpoint write."""
    rng, newest, torn = random.Random(0), 0, 0
    last = run_dir / "checkpoints" / "last.ckpt"
    for kill in range(kills):
        signum = (signal.SIGKILL, signal.SIGTERM)[kill % 2]
        began = time.time()
        proc = train_process(cwd, f"run_dir={run_dir}", *args)
        deadline = time.monotonic() + 120
        while not (last.exists() and last.stat().st_mtime > began):  # this process has saved one
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        others = [p.name for p in run_dir.rglob("*.tmp") if f"-{proc.pid}-" not in p.name]
        assert not others, (kill, others)  # the debris of the last kill is gone (this process's own may be in flight)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signum)
        killed = finish(proc)[0]
        assert killed.returncode in (128 + signum, -signal.SIGKILL), (kill, killed.stderr[-2000:])
        torn += bool(list(run_dir.rglob("*.tmp")))  # the kill landed inside a checkpoint write
        step = checkpoint(run_dir)["global_step"]
        assert newest < step < steps, (kill, newest, step)  # resumed from the newest and got further
        assert [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".tmp")] == ["last.ckpt"]
        newest = step
    return torn


def test_kill_drill_sigkill_and_sigterm_at_random_moments(tmp_path):
    """One run killed 4 times (kill_repeatedly; a checkpoint every step, 12 MB, batch 1: writing takes most of
    the time, so SIGKILLs land inside writes), then resumed to its end, ends with only last.ckpt, no temporary
    file, and bitwise equal to an uninterrupted run (trained meanwhile). Neither of those two checkpoints
    every step (a run option: the same bits)."""
    drill = [*CPU, "data.n=64", "model.width=3000", "model.ensemble=8", "data.k=6", "data.batch_size=1",
             "eval.size=64", "eval.every_n_steps=400", "checkpoint.every_n_steps=1", "trainer.max_steps=400",
             "eval.hidden_progress=false", "resume=auto"]
    once = "checkpoint.every_n_steps=400"
    reference, run_dir = train_process(tmp_path, f"run_dir={tmp_path / 'reference'}", *drill, once), tmp_path / "run"
    try:
        torn = kill_repeatedly(tmp_path, run_dir, drill, kills=4, steps=400)
        done = train(tmp_path, f"run_dir={run_dir}", *drill, once)
        assert done.returncode == 0, done.stderr[-2000:]
    except BaseException:
        os.killpg(reference.pid, signal.SIGKILL)
        raise
    done = finish(reference)[0]
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint(run_dir)["global_step"] == 400
    assert same_weights(checkpoint(run_dir)["state_dict"], checkpoint(tmp_path / "reference")["state_dict"])
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not list(run_dir.rglob("*.tmp"))
    print(f"kill drill: {torn} of 4 kills landed inside a checkpoint write")


def test_sigterm_stops_every_ddp_rank_at_one_step_and_the_run_continues(tmp_path):
    """Lightning's DDP launcher: SIGTERM to rank 0 reaches rank 1; both stop at the same step (the checkpoint
    is saved collectively), rank 0 says so once, and resume=auto continues the run (to a budget past the stop)."""
    ddp = [*CPU, "trainer.devices=2", "trainer.strategy=ddp", "data.k=6", "data.batch_size=2048", "eval.size=64",
           "eval.every_n_steps=100000", "checkpoint.every_n_steps=100000"]
    run_dir = tmp_path / "run"
    proc = train_process(tmp_path, f"run_dir={run_dir}", *ddp, "trainer.max_steps=100000")  # never done in time
    wait_for(run_dir / "tb", proc)
    time.sleep(1.0)  # inside training: rank 0 made tb just before it
    proc.send_signal(signal.SIGTERM)
    done = finish(proc)[0]
    assert done.returncode == 143, done.stderr[-2000:]
    step = checkpoint(run_dir)["global_step"]
    assert done.stderr.strip().splitlines() == [f"stopped by SIGTERM: checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} "
                                                f"at step {step}; resume=auto continues"], done.stderr[-2000:]
    resumed = train(tmp_path, f"run_dir={run_dir}", *ddp, f"trainer.max_steps={step + 50}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint(run_dir)["global_step"] == step + 50
