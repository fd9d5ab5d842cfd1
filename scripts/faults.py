"""The fault and bad-input drill: each case run as a user (or a hostile one) would, with what it printed.

    python scripts/faults.py [--only NAME[,NAME...]] [--markdown]

Each case sets up tiny runs in a fresh temporary directory, runs one command and records its exit status
and last stderr line. A case passes when the command ends in one line (``error: ...`` or ``stopped by ...``)
with the status the case expects, no traceback, and the case's check of what is left on disk holds.
The table is docs/results.md's (Faults and hostile input); tests/test_faults.py drills the same classes where
they are quick.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
TINY = ("trainer=cpu", "trainer.progress_bar=false", "data.n=20", "data.k=2", "eval.size=256", "trainer.max_steps=20",
        "eval.every_n_steps=10", "checkpoint.every_n_steps=10")
LONG = ("trainer=cpu", "trainer.progress_bar=false", "data.n=100", "data.k=8", "eval.size=256",
        "trainer.max_steps=100000", "eval.every_n_steps=50", "checkpoint.every_n_steps=50")


def env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PARITYLAB_"))
            and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


@dataclass
class Result:
    command: str
    status: Optional[int]
    stderr: str
    held: bool = True  # the case's own check of what is on disk
    expect: tuple = (2,)

    @property
    def line(self) -> str:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    @property
    def ok(self) -> bool:
        one_line = self.line.startswith(("error: ", "stopped by ")) and "Traceback" not in self.stderr
        return self.status in self.expect and (one_line or self.status == 0) and self.held


def python(*args: str, cwd: Path, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=kw.pop("env", env()), capture_output=True, text=True,
                          timeout=timeout, **kw)


def train(w: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return python(str(ROOT / "train.py"), *args, cwd=w, **kw)


def finished_run(w: Path, name: str = "run", *args: str) -> Path:
    run = w / name
    done = train(w, f"run_dir={run}", *TINY, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def started(w: Path, name: str, *args: str, ready: str = "checkpoints/last.ckpt", **kw) -> tuple[subprocess.Popen, Path]:
    """A long run in the background, returned once ``ready`` exists in its directory."""
    run = w / name
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"run_dir={run}", *LONG, *args], cwd=w,
                            env=kw.get("env", env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (run / ready).exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"background run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    return proc, run


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def result(command: str, done: subprocess.CompletedProcess, held: bool = True, expect=(2,)) -> Result:
    return Result(command, done.returncode, done.stderr, held, expect)


def weight_offset(ckpt: Path) -> int:
    """An offset inside the largest tensor record of a checkpoint (a weight matrix)."""
    with zipfile.ZipFile(ckpt) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(ckpt, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def flip(path: Path, offset: int, bit: int = 6) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def edit_checkpoint(path: Path, change: Callable[[dict], None]) -> None:
    import torch
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


CASES: dict[str, Callable[[Path], Result]] = {}


def case(fn: Callable[[Path], Result]) -> Callable[[Path], Result]:
    CASES[fn.__name__] = fn
    return fn


@case
def bitflip_resume(w: Path) -> Result:
    run = finished_run(w)
    flip(run / "checkpoints/last.ckpt", weight_offset(run / "checkpoints/last.ckpt"))
    done = train(w, f"run_dir={run}", "resume=auto", *TINY[:-3], "trainer.max_steps=40")
    return result("flip a bit in a weight of last.ckpt; train.py run_dir=R resume=auto trainer.max_steps=40", done,
                  held=json.loads((run / "summary.json").read_text())["steps"] == 20)


@case
def bitflip_eval(w: Path) -> Result:
    run = finished_run(w)
    flip(run / "checkpoints/last.ckpt", weight_offset(run / "checkpoints/last.ckpt"))
    done = python("eval.py", str(run), cwd=ROOT)
    return result("flip a bit in a weight of last.ckpt; eval.py R", done, held=not (run / "eval.json").exists())


@case
def eval_live_run(w: Path) -> Result:
    proc, run = started(w, "live")
    done = python("eval.py", str(run), cwd=ROOT)
    stop(proc)
    return result("eval.py R while R trains", done, held=not (run / "eval.json").exists())


@case
def run_dir_inside_run(w: Path) -> Result:
    proc, run = started(w, "live")
    done = train(w, f"run_dir={run}/checkpoints", *TINY)
    status, err = stop(proc)
    return result("train.py run_dir=<live run>/checkpoints", done, held=status == 128 + signal.SIGTERM)


@case
def lock_unlinked(w: Path) -> Result:
    proc, run = started(w, "live")
    (run / ".lock").unlink()
    done = train(w, f"run_dir={run}", "resume=auto", *LONG)
    status, err = stop(proc)
    return result("rm R/.lock under a live run; train.py run_dir=R resume=auto", done,
                  held=status == 128 + signal.SIGTERM)


def sweep(w: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *LONG, "--grid", "seed=0,1", "--out", str(out),
                             *extra], cwd=w, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{path} never appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


def cell_pids(out: Path) -> list[int]:
    pids = []
    for lock in out.glob("runs/*/.lock"):
        text = lock.read_text().strip()
        if text.isdigit() and Path(f"/proc/{text}").exists():
            pids.append(int(text))
    return pids


@case
def sweep_sigkill(w: Path) -> Result:
    out = w / "sweep"
    proc = sweep(w, out)
    wait_for(out / "runs/seed=0/checkpoints/last.ckpt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60  # a cell told to stop saves a checkpoint first
    while cell_pids(out) and time.time() < deadline:
        time.sleep(0.5)
    orphans = cell_pids(out)
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    log = (out / "runs/seed=0/train.log").read_text()
    return Result("kill -9 sweep.py while a cell trains: is the cell left training?", -9,
                  f"stopped by SIGKILL: {len(orphans)} cells left training", held=not orphans and "stopped by" in log,
                  expect=(-9,))


@case
def two_sweeps(w: Path) -> Result:
    out = w / "sweep"
    first = sweep(w, out, "--jobs", "1")
    wait_for(out / "runs/seed=0/checkpoints/last.ckpt", first)
    second = sweep(w, out, "--jobs", "1")
    try:
        _, err = second.communicate(timeout=60)
        status = second.returncode
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGTERM)
        _, err = second.communicate()
        status = second.returncode
    os.killpg(first.pid, signal.SIGTERM)
    _, first_err = first.communicate(timeout=120)
    log = (out / "runs/seed=0/train.log").read_text()
    return Result("sweep.py --out D twice at once", status, err,
                  held=first.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in log)


@case
def yaml_tag(w: Path) -> Result:
    done = train(w, "data.task=!!python/object/apply:os.system [\"true\"]", *TINY)
    return result("train.py 'data.task=!!python/object/apply:os.system [\"true\"]'", done)


@case
def yaml_tag_sweep(w: Path) -> Result:
    done = python(str(ROOT / "sweep.py"), *TINY, "--grid", "data.task=!!python/name:os.system,parity", "--out",
                  str(w / "s"), cwd=w)
    return result("sweep.py --grid 'data.task=!!python/name:os.system,parity'", done)


@case
def k_equals_n(w: Path) -> Result:
    done = train(w, f"run_dir={w / 'r'}", *TINY[:2], "data.n=6", "data.k=6", "eval.size=64", "trainer.max_steps=20",
                 "eval.every_n_steps=10")
    return result("train.py data.n=6 data.k=6", done, expect=(0, 2))


@case
def long_component(w: Path) -> Result:
    done = train(w, f"run_dir={w / ('x' * 300)}", *TINY)
    return result("train.py run_dir=<300-character name>", done)


@case
def no_optimizer_state(w: Path) -> Result:
    run = finished_run(w)
    edit_checkpoint(run / "checkpoints/last.ckpt", lambda c: c.pop("optimizer_states"))
    done = train(w, f"run_dir={run}", "resume=auto", *TINY[:-3], "trainer.max_steps=40")
    return result("last.ckpt without optimizer_states; train.py run_dir=R resume=auto", done)


@case
def other_lightning(w: Path) -> Result:
    run = finished_run(w)
    edit_checkpoint(run / "checkpoints/last.ckpt", lambda c: c.update({"pytorch-lightning_version": "1.9.5"}))
    done = train(w, f"run_dir={run}", "resume=auto", *TINY[:-3], "trainer.max_steps=40")
    return result("last.ckpt written by Lightning 1.9.5; train.py run_dir=R resume=auto", done)


@case
def config_not_utf8(w: Path) -> Result:
    run = finished_run(w)
    (run / "config.yaml").write_bytes((run / "config.yaml").read_bytes() + b"# \xff\xfe\n")
    done = python("eval.py", str(run), cwd=ROOT)
    return result("config.yaml with non-UTF-8 bytes; eval.py R", done)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@case
def eval_read_only(w: Path) -> Result:
    run = finished_run(w)
    mount("--bind", str(run), str(run))
    try:
        mount("-o", "remount,ro,bind", str(run))
        done = python("eval.py", str(run), cwd=ROOT)
    finally:
        subprocess.run(["umount", str(run)], check=True)
    return result("eval.py R, R on a read-only mount", done, held=not (run / "eval.json").exists())


@case
def disk_full(w: Path) -> Result:
    disk = w / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk))
    try:
        done = train(w, f"run_dir={disk / 'r'}", *TINY, "model.width=2048")
        held = not (disk / "r/checkpoints/last.ckpt").exists() and not any((disk / "r").rglob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    return result("train.py run_dir=<300 KiB file system> model.width=2048 (checkpoint > 300 KiB)", done, held=held)


@case
def eval_ctrl_c(w: Path) -> Result:
    run = finished_run(w)
    proc = subprocess.Popen([sys.executable, "eval.py", str(run)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return Result("Ctrl-C (SIGINT) during eval.py R", proc.returncode, err, expect=(130, 0),
                  held=not any(run.glob(".*.tmp")))


@case
def stdout_closed(w: Path) -> Result:
    r, wr = os.pipe()
    os.close(r)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"run_dir={w / 'r'}", *TINY], cwd=w, env=env(),
                          stdout=wr, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(wr)
    return result("train.py ... | true (stdout closed)", done, held=(w / "r/summary.json").exists(), expect=(0,))


@case
def stdout_ascii(w: Path) -> Result:
    done = train(w, f"run_dir={w / 'rün'}", *TINY, env={**env(), "PYTHONIOENCODING": "ascii"})
    return result("PYTHONIOENCODING=ascii train.py run_dir=rün", done, held=(w / "rün/summary.json").exists(),
                  expect=(0,))


def file_limit(size: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@case
def file_size_limit(w: Path) -> Result:
    done = train(w, f"run_dir={w / 'r'}", *TINY, "model.width=2048", preexec_fn=file_limit(200_000))
    last = w / "r/checkpoints/last.ckpt"
    return result("ulimit -f 200 (KiB); train.py model.width=2048 (checkpoint > 200 KiB)", done,
                  held=not last.exists() and not any((w / "r").rglob(".*.tmp")))


@case
def tb_removed(w: Path) -> Result:
    proc, run = started(w, "live", "trainer.max_steps=2000", ready="tb")
    time.sleep(1)
    shutil.rmtree(run / "tb")
    _, err = proc.communicate(timeout=300)
    return Result("rm -r R/tb while R trains", proc.returncode, err, expect=(0, 2),  # ends, or stops resumable
                  held=(run / "summary.json").exists() or (run / "checkpoints/last.ckpt").exists())


@case
def budget_below_checkpoint(w: Path) -> Result:
    run = finished_run(w)
    before = (run / "config.yaml").read_text()
    done = train(w, f"run_dir={run}", "resume=auto", *TINY[:-3], "trainer.max_steps=10")
    return result("train.py run_dir=R resume=auto trainer.max_steps=10 (R at step 20)", done,
                  held=(run / "config.yaml").read_text() == before)


@case
def empty_resume(w: Path) -> Result:
    return result("train.py resume= (an unset variable)", train(w, "resume=", *TINY))


@case
def empty_run_dir(w: Path) -> Result:
    return result("train.py run_dir= (an unset variable)", train(w, "run_dir=", *TINY), held=not (w / "runs").exists())


@case
def eval_duplicate_devices(w: Path) -> Result:
    run = finished_run(w)
    done = python("eval.py", str(run), "trainer.devices=[0,0]", cwd=ROOT)
    return result("eval.py R trainer.devices=[0,0]", done, held=not list(run.glob("eval*.json")))


@case
def checkpoint_before_key(w: Path) -> Result:
    run = finished_run(w)
    edit_checkpoint(run / "checkpoints/last.ckpt", lambda c: c["paritylab_settings"].pop("optim.grad_clip"))
    done = train(w, f"run_dir={run}", "resume=auto", *TINY[:-3], "trainer.max_steps=40")
    return result("last.ckpt from before optim.grad_clip existed; resume=auto", done, expect=(0,))


@case
def sighup(w: Path) -> Result:
    proc, run = started(w, "live")
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    return Result("SIGHUP to a training run", proc.returncode, err, expect=(128 + signal.SIGHUP,),
                  held=(run / "checkpoints/last.ckpt").exists())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"error: --only: unknown case {unknown[0]!r} (known: {', '.join(CASES)})", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as w:
            os.chmod(w, 0o755)
            start = time.perf_counter()
            try:
                r = CASES[name](Path(w))
            except Exception as err:  # the drill's own setup failed: show it, go on
                r = Result("(setup)", None, f"{type(err).__name__}: {err}", held=False)
            wall = time.perf_counter() - start
        failed += not r.ok
        verdict = "held" if r.ok else "FAILED"
        if args.markdown:
            line = r.line.replace("|", "\\|")[:160]
            print(f"| {name} | `{r.command}` | {r.status} | {line} | {verdict} |", flush=True)
        else:
            print(f"{name:<24} {verdict:<6} status={r.status} {wall:5.1f}s  {r.line[:150]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
