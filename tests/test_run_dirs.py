"""Run directories: none is overwritten, a live one is locked, bad places are refused before anything is written."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from config import ConfigError
from runtime.run_dirs import HOST, RunDirLock, claim, make_run_dir, write_atomic
from conftest import checkpoint, dead_pid, early, finish, one_error_line, train, train_all, train_process, wait_for

CPU = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "eval.size=256"]
SHORT = [*CPU, "trainer.max_steps=200", "eval.every_n_steps=100", "checkpoint.every_n_steps=100", "data.k=6"]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under run_dir (the lock aside) with a digest of its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


@early
def finished_run(tmp: Path, jobs: int) -> Path:
    """A finished SHORT run (copy it before changing it)."""
    done = train(tmp, f"run_dir={tmp / 'run'}", *SHORT)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "run"


def test_a_run_dir_holding_a_run_is_refused_and_left_as_it_was(tmp_path, finished_run):
    before = snapshot(finished_run)
    one_error_line(train(tmp_path, f"run_dir={finished_run}", *SHORT, "seed=1"), f"run_dir: {finished_run} already holds")
    assert snapshot(finished_run) == before


def test_resuming_a_finished_run_is_a_no_op_that_says_so(tmp_path, finished_run):
    before = snapshot(finished_run)
    done = train(tmp_path, f"run_dir={finished_run}", *SHORT, "resume=auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished at step 200" in done.stdout and "nothing to do" in done.stdout
    assert snapshot(finished_run) == before


def test_a_second_live_process_is_kept_out_of_a_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    first = train_process(tmp_path, f"run_dir={run_dir}", *CPU, "trainer.max_steps=100000", "data.k=6",
                          "data.batch_size=2048", "eval.every_n_steps=1000", "checkpoint.every_n_steps=1000")
    try:
        wait_for(run_dir / "config.yaml", first)
        before = (run_dir / "config.yaml").read_text()
        refused = train_all(tmp_path, {"new": [f"run_dir={run_dir}", *SHORT],  # not even to continue it; both at once
                                       "resume": [f"run_dir={run_dir}", *SHORT, "resume=auto"]})
        for done in refused.values():
            line = one_error_line(done, f"run_dir: {run_dir} is in use")
            assert f"(pid {first.pid})" in line
        assert (run_dir / "config.yaml").read_text() == before
    finally:
        first.terminate()
        finish(first)
    assert first.returncode == 143


def test_a_forced_resume_of_another_runs_checkpoint_writes_a_fresh_directory(tmp_path, finished_run):
    before = snapshot(finished_run)
    done = train(tmp_path, f"resume={finished_run / 'checkpoints' / 'last.ckpt'}", *SHORT, "seed=5",
                 "trainer.max_steps=300", "resume_force=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(finished_run) == before
    (fresh,) = (tmp_path / "runs" / "parity_mlp").iterdir()
    assert checkpoint(fresh)["global_step"] == 300 and "seed: 5" in (fresh / "config.yaml").read_text()


def test_a_moved_run_resumes_into_last_ckpt_without_versioned_siblings(tmp_path, finished_run):
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    gone = dead_pid()
    (moved / "checkpoints" / f".last.ckpt.{HOST}-{gone}-0badc0de.tmp").write_bytes(b"torn")  # a kill mid-write
    (moved / f".summary.json.{gone}-0badc0de.tmp").write_text("{")  # named as before temp files named their host
    for steps in (400, 600):  # the second resume must start from the first one's checkpoint
        done = train(tmp_path, f"run_dir={moved}", *SHORT, "resume=auto", f"trainer.max_steps={steps}")
        assert done.returncode == 0 and done.stderr.strip() == "", done.stderr[-2000:]  # no Lightning notices
        assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["last.ckpt"]
        assert checkpoint(moved)["global_step"] == steps
    assert not list(moved.glob(".*.tmp"))


@pytest.mark.parametrize("place,problem", [
    ("file", "is a file"), ("file/run", "is under"), ("/nonexistent-paritylab/deep/run", "its parent directory"),
    ("/sys/paritylab-run", "cannot create"),
])
def test_impossible_run_dirs_are_one_line_and_write_nothing(tmp_path, place, problem):
    (tmp_path / "file").write_text("not a directory")
    run_dir = Path(place) if place.startswith("/") else tmp_path / place
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="^run_dir: ") as refused:
        claim(run_dir, resumes_it=False)  # train.py's check_place, then its claim before anything is written
    assert problem in str(refused.value) and "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/nonexistent-paritylab").exists()


def test_train_py_refuses_a_run_dir_under_a_file_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = one_error_line(train(tmp_path, f"run_dir={tmp_path / 'file' / 'run'}", *SHORT), "run_dir: ")
    assert "is under" in line and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_an_unwritable_run_dir_is_refused():
    target = Path("/sys/kernel")
    try:
        (target / "paritylab-probe").touch()
        pytest.skip(f"{target} is writable here: no unwritable directory to try")
    except OSError:
        pass
    with pytest.raises(ConfigError, match=f"^run_dir: {target} is not writable"):
        claim(target, resumes_it=False)


def test_claim_refuses_a_locked_or_occupied_directory_and_cleans_debris(tmp_path):
    run_dir = tmp_path / "run"
    lock = claim(run_dir, resumes_it=False)
    with pytest.raises(ConfigError, match=rf"is in use by another live run \(pid {os.getpid()}\)"):
        RunDirLock(run_dir)  # another open file description conflicts, even in this process
    write_atomic(run_dir / "config.yaml", "seed: 0\n")
    lock.release()
    with pytest.raises(ConfigError, match="already holds a run"):
        claim(run_dir, resumes_it=False)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / f".last.ckpt.{HOST}-{dead_pid()}-0123abcd.tmp").write_bytes(b"")
    claim(run_dir, resumes_it=True).release()
    assert not list((run_dir / "checkpoints").iterdir())
    a, b = make_run_dir("x", 0, tmp_path), make_run_dir("x", 0, tmp_path)
    assert a != b and a.is_dir() and b.is_dir()
