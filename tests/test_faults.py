"""Faults and hostile input: damaged checkpoints, locks every writer takes, sweeps that own their cells, write
errors, signals, and values that must not be taken as something else. Each ends in one line (or a clean stop)
with nothing half-written, and the run stays resumable. scripts/faults.py runs the same classes as a table."""
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import datamodules  # noqa: F401  (registers every task's declarations: compose below)
import lightning_modules  # noqa: F401  (and every model family's)
from conftest import (ROOT, at_once, clean_env, dead_pid, eval_py, finish, one_error_line, start, train,
                      train_process, wait_for)
from config import ConfigError, compose
from metrics.hidden_progress import column_norm_image
from runtime.checkpointing import check_resumable, digest_matches, read_checkpoint, write_digested
from runtime.console import Guarded
from runtime.run_dirs import HOST, claim, temp_name

LIVE = ("trainer=cpu", "trainer.progress_bar=false", "data.n=100", "data.k=8", "eval.size=64",
        "trainer.max_steps=100000", "eval.every_n_steps=20", "checkpoint.every_n_steps=20")  # never solves


def copy_run(preset_runs, tmp_path: Path, name: str = "run") -> Path:
    run_dir, done = preset_runs["parity_mlp"]
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(shutil.copytree(run_dir, tmp_path / name))


def resume(run: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return train(run.parent, "experiment=parity_mlp", f"run_dir={run}", "resume=auto", "trainer=cpu",
                 "trainer.progress_bar=false", "eval.every_n_steps=10", "checkpoint.every_n_steps=10", "eval.size=64",
                 *args, **kw)


# --- checkpoint integrity -------------------------------------------------------------------------------------
def digested(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    write_digested(checkpoint, buffer)
    return buffer.getvalue()


def test_the_digest_catches_a_flipped_bit_at_every_offset():
    data = digested({"state_dict": {"w": torch.randn(64, 8)}, "global_step": 7, "paritylab": {"n": 8}})
    assert digest_matches(data) is True
    assert torch.load(io.BytesIO(data), weights_only=True)["global_step"] == 7  # still a plain torch checkpoint
    missed = []
    for offset in range(len(data)):  # every byte: records, zip headers, the end record and the digest itself
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (offset % 8)
        if digest_matches(bytes(flipped)) is not False:
            missed.append(offset)
    assert not missed, f"{len(missed)} of {len(data)} flipped offsets pass, first {missed[:5]}"
    plain = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, plain)
    assert digest_matches(plain.getvalue()) is None  # written before digests: loads unchecked


def test_a_damaged_checkpoint_is_refused_by_train_and_eval_with_nothing_written(preset_runs, tmp_path):
    run = copy_run(preset_runs, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x40
    last.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert "is damaged" in one_error_line(resume(run, "trainer.max_steps=40"), f"resume: {last}")
    assert "is damaged" in one_error_line(eval_py(str(run)), f"run_dir: {last}")  # one at a time: each locks run
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_checkpoints_that_cannot_be_continued_are_refused_and_old_ones_load_said_once(preset_runs, tmp_path, capsys):
    last = copy_run(preset_runs, tmp_path) / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    cases = {"no optimizer": ({k: v for k, v in checkpoint.items() if k != "optimizer_states"}, "lacks optimizer_states"),
             "Lightning 1": ({**checkpoint, "pytorch-lightning_version": "1.9.5"}, "written by Lightning 1.9.5")}
    for name, (edited, says) in cases.items():
        torch.save(edited, last)  # torch's own writer: no digest
        with pytest.raises(ConfigError, match=says):
            check_resumable(read_checkpoint(last), last)
        assert read_checkpoint(last, key="run_dir")["global_step"] == checkpoint["global_step"]  # weights serve
    said = [line for line in capsys.readouterr().err.splitlines() if "carries no digest" in line]
    assert len(said) == 1, said


# --- locks and who may remove what ------------------------------------------------------------------------------
def test_a_live_run_keeps_out_eval_a_nested_run_and_a_second_run_even_without_its_lock_file(tmp_path):
    proc = train_process(tmp_path, f"run_dir={tmp_path / 'live'}", *LIVE)
    live = tmp_path / "live"
    try:
        wait_for(live / "checkpoints" / "last.ckpt", proc)
        (live / ".lock").unlink()  # the pid note goes; the lock is the directory's
        done = at_once({"eval": lambda: eval_py(str(live)),
                        "nested": lambda: train(tmp_path, f"run_dir={live}/checkpoints", *LIVE),
                        "second": lambda: train(tmp_path, f"run_dir={live}", "resume=auto", *LIVE)})
        assert proc.poll() is None
        one_error_line(done["eval"], f"run_dir: {live} is in use by another live run")
        one_error_line(done["nested"], f"run_dir: {live}/checkpoints is inside the run directory {live}")
        one_error_line(done["second"], f"run_dir: {live} is in use by another live run")
        assert not (live / "eval.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGHUP)  # a closed terminal stops the run like SIGTERM
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGHUP: checkpoint"), err[-2000:]
    assert read_checkpoint(live / "checkpoints" / "last.ckpt")["global_step"] > 0


def test_claim_removes_temporary_files_only_of_writers_that_are_gone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = temp_name(run / "summary.json")  # this process: alive
    gone = run / f".config.yaml.{HOST}-{dead_pid()}-0123abcd.tmp"
    elsewhere = run / f".config.yaml.othernode-{dead_pid()}-0123abcd.tmp"
    for path in (mine, gone, elsewhere):
        path.write_text("partial")
    claim(run, resumes_it=False).release()
    assert mine.exists() and elsewhere.exists() and not gone.exists()


# --- sweeps own their cells ----------------------------------------------------------------------------------
def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_sweep_owns_its_out_and_its_cells_die_with_it_even_by_sigkill(tmp_path):
    out = tmp_path / "sweep"
    sweep = [sys.executable, str(ROOT / "sweep.py"), *LIVE, "--grid", "seed=0,1", "--out", str(out)]
    first = start(sweep, tmp_path)
    cell_dir = out / "runs" / "seed=0"
    try:
        wait_for(cell_dir / "checkpoints" / "last.ckpt", first)
        cell = int((cell_dir / ".lock").read_text())  # the cell's train.py, in a session of its own
        second = finish(start(sweep, tmp_path))[0]
        one_error_line(second, f"--out: {out} is in use by another live sweep (pid {first.pid})")
        os.kill(first.pid, signal.SIGKILL)  # the sweep alone
        first.wait()
        deadline = time.time() + 120
        while running(cell) and time.time() < deadline:
            time.sleep(0.5)
        assert not running(cell), "the cell trains on without its sweep"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    text = (cell_dir / "train.log").read_text()
    assert text.startswith("--- ") and "Traceback" not in text, text[-2000:]
    assert read_checkpoint(cell_dir / "checkpoints" / "last.ckpt")["global_step"] > 0  # whole: resumable


# --- write errors ----------------------------------------------------------------------------------------------
def limit_file_size(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_file_size_limit_during_a_checkpoint_write_is_one_line_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    args = ("experiment=parity_mlp", f"run_dir={run}", "trainer=cpu", "trainer.progress_bar=false", "model.width=2048",
            "trainer.max_steps=20", "eval.every_n_steps=10", "checkpoint.every_n_steps=10", "eval.size=64")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_file_size(300_000))  # the checkpoint is ~1 MiB
    out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = one_error_line(done, f"cannot write {run / 'checkpoints' / 'last.ckpt'}: File too large")
    assert "resume=auto continues" in line
    assert not (run / "checkpoints" / "last.ckpt").exists() and not list(run.rglob(".*.tmp"))
    again = train(tmp_path, *args, "resume=auto")  # no limit now: the run starts over and finishes
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def mounted(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()})")


def test_a_full_disk_and_a_read_only_run_directory_are_one_line_with_nothing_half_written(preset_runs, tmp_path):
    disk, run = tmp_path / "disk", copy_run(preset_runs, tmp_path)
    disk.mkdir()
    mounted("-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk))
    try:
        mounted("--bind", str(run), str(run))
        try:
            mounted("-o", "remount,ro,bind", str(run))
            done = at_once({"full": lambda: train(tmp_path, "experiment=parity_mlp", f"run_dir={disk / 'r'}",
                                                  "trainer=cpu", "trainer.progress_bar=false", "model.width=2048",
                                                  "trainer.max_steps=20", "eval.every_n_steps=10", "eval.size=64",
                                                  "checkpoint.every_n_steps=10"),
                            "read-only": lambda: eval_py(str(run))})
        finally:
            subprocess.run(["umount", str(run)], check=True)
        assert "No space left on device" in one_error_line(done["full"], f"cannot write {disk / 'r'}")
        assert not (disk / "r" / "checkpoints" / "last.ckpt").exists() and not list(disk.rglob(".*.tmp"))
        one_error_line(done["read-only"], f"run_dir: {run} is not writable (Read-only file system)")
        assert not (run / "eval.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- values, budgets, images, streams ----------------------------------------------------------------------------
@pytest.mark.parametrize("arg, says", [
    ("data.task=!!python/object/apply:os.system [\"true\"]", "data.task: '!!python/object/apply:os.system"),
    ("resume=", "resume: empty value"), ("run_dir=", "run_dir: empty value"), ("data.n= ", "data.n: empty value"),
    ("run_dir=" + "x" * 300, "run_dir: xxxxxxxxxxxxxxxxxxxxxxxx... is a name of 300 bytes"),
])
def test_values_that_must_not_be_taken_as_something_else(arg, says):
    with pytest.raises(ConfigError) as err:
        compose([arg])
    assert str(err.value).startswith(says), err.value


def test_a_budget_below_the_checkpoint_is_refused_before_config_yaml_changes(preset_runs, tmp_path):
    run = copy_run(preset_runs, tmp_path)
    before = (run / "config.yaml").read_text()
    done = resume(run, "trainer.max_steps=10")
    one_error_line(done, "trainer.max_steps: 10 is below step 20 of")
    assert (run / "config.yaml").read_text() == before


def test_the_hidden_progress_image_draws_k_equal_to_n():
    image = column_norm_image(torch.rand(3, 5), secret=[0, 1, 2, 3, 4])
    assert image.shape == (5 * 4, 4 + 3 * 4, 3) and image.dtype == torch.uint8


def test_a_closed_reader_and_an_ascii_terminal_do_not_stop_a_run(tmp_path):
    read, write = os.pipe()
    os.close(read)
    guarded = Guarded(io.TextIOWrapper(os.fdopen(os.dup(write), "wb"), write_through=True))
    guarded.write("to nobody\n")  # BrokenPipeError inside: swallowed, the stream now goes to /dev/null
    guarded.flush()
    run = tmp_path / "rün"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"run_dir={run}", "trainer=cpu",
                             "trainer.progress_bar=false", "data.n=20", "data.k=2", "trainer.max_steps=20",
                             "eval.every_n_steps=10", "eval.size=64"], cwd=tmp_path, stdout=write,
                            stderr=subprocess.PIPE, env={**clean_env(), "PYTHONIOENCODING": "ascii"})
    os.close(write)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err.decode(), err[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(preset_runs, tmp_path):
    run = copy_run(preset_runs, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    del checkpoint["paritylab_settings"]["optim.grad_clip"]  # as if written before optim.grad_clip existed
    torch.save(checkpoint, last)
    done = resume(run, "trainer.max_steps=40")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 40
