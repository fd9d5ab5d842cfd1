"""Checkpoints a kill cannot corrupt, and resuming from them exactly.

* ``AtomicCheckpointIO`` writes a checkpoint to a temporary file beside the target, fsyncs it and
  renames it over the target: a kill at any moment leaves the old file or the new one, never a torn one.
  It hands Lightning the checkpoint train.py already loaded and checked (``preload``), so the file is read once.
* Every checkpoint carries the SHA-256 of its bytes in its zip archive's comment (``write_digested``);
  ``read_checkpoint`` verifies it before torch unpickles anything, so a flipped bit anywhere in the file is
  refused in one line. A checkpoint written before digests loads unchecked, said once.
* ``resume_path`` turns ``resume=PATH|auto`` into a file; ``load_for_resume`` refuses, with one line, a
  missing or unreadable checkpoint, one of another problem (experiment, seed, the task's identity: n, k, secret, ...) or shape, and
  one trained with other settings (``run_settings``: optimizer, schedule, model, data). ``resume_force=true``
  accepts the last two, and ``adopt_settings`` then makes the new optimizer settings take effect.
* ``ResumeState`` stores that identity, the settings and the RNG states in every checkpoint and puts the RNG back.
* ``KillAtStep`` (environment ``PARITYLAB_KILL_AT_STEP=N``) SIGKILLs the process: the resume tests' fault drill.
"""
import hashlib
import io
import logging
import os
import random
import signal
import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from omegaconf import OmegaConf

from config import Config, ConfigError
from lightning_modules.lightning_adapter import batches_that_stepped
from runtime.run_dirs import write_atomic

IDENTITY_KEY = "paritylab"  # checkpoint entry: what problem the weights were trained on
RNG_KEY = "paritylab_rng"
LOGGED_STEP_KEY = "paritylab_logged_step"
SETTINGS_KEY = "paritylab_settings"
KILL_AT_STEP_ENV = "PARITYLAB_KILL_AT_STEP"
REQUEUE_SNAPSHOT = "hpc_ckpt_"  # Lightning's name for what its SLURM signal handler saves
log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the target's directory, fsync, os.replace, fsync the directory.

    (Lightning's own writer goes through a temp file in /tmp and a move, which across file systems is
    a copy a kill can interrupt.) Lightning's SLURM requeue handler saves hpc_ckpt_N.ckpt from inside
    the signal handler, mid training step, and on restart would resume from it unasked, off the batch
    grid that evaluation and checkpoints follow. That snapshot is not written: a requeued job resumes
    from last.ckpt (resume=auto).
    """

    def __init__(self, preload: Optional[tuple[Path, dict]] = None):
        super().__init__()
        self.preload = preload  # (path, checkpoint): what load_checkpoint returns for that path, once

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        if self.preload is not None and Path(path).resolve() == self.preload[0].resolve():
            checkpoint, self.preload = self.preload[1], None
            return checkpoint
        # also Lightning's own files (the weights ddp_spawn's workers hand back)
        return load_verified(Path(path), map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        if path.name.startswith(REQUEUE_SNAPSHOT):
            log.info(f"not writing {path}: a requeued job resumes from last.ckpt")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda file: write_digested(checkpoint, file))


DIGEST_TAG = b"paritylab-sha256:"  # + 64 hex digits: the archive comment of a checkpoint we wrote
DIGEST_COMMENT = len(DIGEST_TAG) + 64
END_RECORD = b"PK\x05\x06"  # a zip archive's last 22 bytes start so; their last 2 are the comment's length
_unchecked_said: set[str] = set()


class HashingWriter:
    """A binary file that hashes what goes through it and keeps its last 22 bytes (torch.save writes in order)."""

    def __init__(self, file: BinaryIO):
        self.file, self.hash, self.tail = file, hashlib.sha256(), b""
        self.error: Optional[OSError] = None  # torch reports a failed write as its own RuntimeError: kept here

    def write(self, data) -> int:
        self.hash.update(data)
        self.tail = (self.tail + bytes(memoryview(data)[-22:]))[-22:]
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def write_digested(checkpoint: dict, file: BinaryIO) -> None:
    """torch.save ``checkpoint`` to ``file`` with the SHA-256 of the saved archive as the archive's comment."""
    writer = HashingWriter(file)
    try:
        torch.save(checkpoint, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise
    if writer.tail[:4] != END_RECORD or writer.tail[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end its archive with a comment-free end record")
    comment = DIGEST_TAG + writer.hash.hexdigest().encode()
    file.seek(-2, os.SEEK_END)
    file.write(len(comment).to_bytes(2, "little") + comment)


def digest_matches(data: bytes) -> Optional[bool]:
    """Whether a checkpoint's bytes match the digest written with them; None where they carry none (written
    before digests, or not a checkpoint of ours at all: torch then says what it is). A file of ours keeps its
    digest comment's tag or its end record's comment length through any one flipped bit, so it is never taken
    for one without a digest."""
    size = len(data) - DIGEST_COMMENT
    end, comment = data[max(size - 22, 0):max(size, 0)], data[max(size, 0):]
    ours_end = size >= 22 and end[:4] == END_RECORD and end[-2:] == DIGEST_COMMENT.to_bytes(2, "little")
    if not ours_end and not comment.startswith(DIGEST_TAG):
        return None
    if not ours_end or not comment.startswith(DIGEST_TAG):
        return False
    digest = hashlib.sha256(memoryview(data)[:size - 2])
    digest.update(b"\0\0")  # as it was hashed: before the comment's length was set
    return digest.hexdigest().encode() == comment[len(DIGEST_TAG):]


RESUME_PARTS = ("epoch", "loops", "optimizer_states", "lr_schedulers", "pytorch-lightning_version")


def load_verified(path: Path, key: str = "resume", **load) -> Any:
    """torch.load (``load``: its options) of the checkpoint at ``path`` once its bytes match the digest written
    with them; one without a digest loads unchecked, said once. ConfigError naming ``key`` and the file where it
    cannot be read or is damaged; torch's own errors for a file it cannot load."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path} ({err.strerror})") from None
    matches = digest_matches(data)
    if matches is False:
        raise ConfigError(f"{key}: {path} is damaged (its bytes do not match the digest written with them)")
    checkpoint = torch.load(io.BytesIO(data), **load)
    if matches is None and str(path) not in _unchecked_said:
        _unchecked_said.add(str(path))
        print(f"warning: {path} carries no digest (written before checkpoints had one): loaded unchecked",
              file=sys.stderr)
    return checkpoint


def read_checkpoint(path: Path, key: str = "resume") -> dict:
    """The paritylab checkpoint at ``path``, verified (``load_verified``) and loaded as Lightning would; ConfigError
    (one line naming ``key`` and the file) where it is damaged, unreadable or not one of ours."""
    try:
        checkpoint = load_verified(path, key, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as err:  # torch raises many kinds on a torn or foreign file
        first = str(err).splitlines()[0] if str(err) else ""
        why = "not a file torch can load safely" if "weights_only" in str(err) else first
        raise ConfigError(f"{key}: {path} is not a readable checkpoint ({type(err).__name__}: {why})") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step", IDENTITY_KEY} <= checkpoint.keys() \
            or not isinstance(checkpoint[IDENTITY_KEY], dict):
        raise ConfigError(f"{key}: {path} is not a paritylab checkpoint (no state_dict, global_step or identity)")
    return checkpoint


def check_resumable(checkpoint: dict, path: Path) -> None:
    """Refuse (ConfigError) a checkpoint that lacks what Lightning needs to continue training from it, or that
    another Lightning major version wrote. Its weights may still serve an evaluation."""
    missing = [part for part in RESUME_PARTS if part not in checkpoint]
    if missing:
        raise ConfigError(f"resume: {path} lacks {', '.join(missing)}, which continuing a run needs "
                          "(its weights still evaluate: eval.py)")
    version = str(checkpoint["pytorch-lightning_version"])
    if version.split(".")[0] != L.__version__.split(".")[0]:
        raise ConfigError(f"resume: {path} was written by Lightning {version}; Lightning {L.__version__} cannot "
                          "continue it exactly (its weights still evaluate: eval.py)")


def run_identity(cfg: Config, task) -> dict:
    """What a checkpoint must match to be resumed: the experiment, the seed and the task's problem."""
    return {"experiment": cfg.experiment, "seed": cfg.seed, **task.identity()}


def identity_defaults(cfg: Config) -> dict:
    """The task's keys at their defaults. A key added to a task keeps the old behaviour at its default, so a
    checkpoint written before the key existed matches a config that leaves it there."""
    return {f.name: f.default for f in fields(cfg.data) if f.default is not MISSING}


def setting_defaults(cfg: Config) -> dict:
    """Every setting at its schema default (``run_settings``' keys): a setting added to the schema after a
    checkpoint was written matches that checkpoint at its default, as a task key does (``identity_defaults``)."""
    return {f"{section.name}.{f.name}": f.default for section in fields(cfg) if is_dataclass(getattr(cfg, section.name))
            for f in fields(getattr(cfg, section.name)) if f.default is not MISSING}


def identity_differences(stored: dict, identity: dict, defaults: Optional[dict] = None) -> list[str]:
    """The keys on which a checkpoint's identity and a run's differ, a key the checkpoint lacks counting as
    equal where the run has it at its default (``identity_defaults``)."""
    defaults = defaults or {}
    return [key for key in dict.fromkeys([*identity, *stored]) if stored.get(key) != identity.get(key)
            and not (key not in stored and key in defaults and identity.get(key) == defaults[key])]


# Options that do not change what is trained (where it runs, how often it is looked at or saved, same-bits
# kernels, the path that computes autograd's update): they may differ on resume. trainer.max_steps is a budget,
# except where the schedule spans it.
RUN_OPTIONS = ("run_dir", "resume", "resume_force", "model.grad", "trainer.max_steps", "trainer.accelerator",
               "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.steps_per_batch", "trainer.progress_bar",
               "trainer.cpu_threads", "eval.every_n_steps", "eval.size",
               "eval.hidden_progress", "checkpoint.every_n_steps", "kernels.backend", "kernels.compile")


def run_settings(cfg: Config) -> dict[str, Any]:
    """The dotted config keys that change training, with their values: what a resume must match."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    exempt = set(RUN_OPTIONS) - ({"trainer.max_steps"} if cfg.optim.schedule == "cosine" else set())
    return {key: value for key, value in flat.items() if key not in exempt}


def resume_path(resume: Optional[str], run_dir: Optional[Path]) -> Optional[Path]:
    """The checkpoint to resume (None: start fresh): resume=PATH, or for resume=auto run_dir's last.ckpt."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    if run_dir is None:
        raise ConfigError("resume: 'auto' needs run_dir=... (or a SLURM / torchrun --rdzv-id job id) "
                          "to know which run to continue")
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.exists() else None


def load_for_resume(path: Path, identity: dict, model: torch.nn.Module, force: bool = False,
                    settings: Optional[dict] = None, defaults: Optional[dict] = None,
                    settings_defaults: Optional[dict] = None) -> tuple[dict, list[str]]:
    """The checkpoint at ``path`` if it can continue this run, and the settings that differ (forced).

    Raises ConfigError (one line) for a missing, unreadable or misshapen checkpoint, and, unless ``force``
    (resume_force=true), for one of another problem or trained with other ``settings``.
    """
    if path.is_dir():
        raise ConfigError(f"resume: {path} is a directory, not a checkpoint file "
                          "(to continue the run in it: run_dir=<it> resume=auto)")
    if not path.is_file():
        raise ConfigError(f"resume: {path} does not exist")
    checkpoint = read_checkpoint(path)
    stored = checkpoint[IDENTITY_KEY]
    differ = [f"{key} {stored.get(key)!r} vs {identity.get(key)!r}"
              for key in identity_differences(stored, identity, defaults)]
    if differ and not force:
        raise ConfigError(f"resume: {path} was trained on another problem (checkpoint vs config: {'; '.join(differ)});"
                          " resume_force=true continues anyway")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
    if found != expected:
        bad = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise ConfigError(f"resume: {path} does not fit the model ({bad[0]}: checkpoint {found.get(bad[0])}, "
                          f"model {expected.get(bad[0])}{f', and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    changed = []
    if settings is not None and SETTINGS_KEY in checkpoint:
        old = checkpoint[SETTINGS_KEY]
        changed = sorted(identity_differences(old, settings, settings_defaults))
        if changed and not force:
            shown = "; ".join(f"{key} {old.get(key)!r} vs {settings.get(key)!r}" for key in changed[:4])
            more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ConfigError(f"resume: {path} was trained with other settings (checkpoint vs config: {shown}{more});"
                              " resume_force=true continues with the new ones")
    problem = [f.split()[0] for f in differ]
    return checkpoint, problem + [key for key in changed if key not in problem]


def adopt_settings(checkpoint: dict, model: L.LightningModule, changed: list[str]) -> None:
    """Make forced new optimizer settings take effect: hyperparameters from the new config in every param
    group; a fresh optimizer state where the optimizer itself changed. Weights and steps are kept."""
    if not any(key.startswith(("optim.", "trainer.max_steps")) for key in changed):
        return
    optimizers = model.configure_optimizers()
    fresh = optimizers if isinstance(optimizers, dict) else {"optimizer": optimizers}
    optimizer = fresh["optimizer"]
    state = optimizer.state_dict()
    stored = checkpoint["optimizer_states"][0]
    if "optim.name" in changed:
        checkpoint["optimizer_states"][0] = state
    else:
        stored["param_groups"] = [{**old, **{k: v for k, v in new.items() if k != "params"}}
                                  for old, new in zip(stored["param_groups"], state["param_groups"])]
    scheduler = fresh.get("lr_scheduler")
    if scheduler is not None and checkpoint.get("lr_schedulers"):  # LambdaLR: new base rates, at the stored step
        scheduler = scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler
        stored_schedule = checkpoint["lr_schedulers"][0]
        groups = checkpoint["optimizer_states"][0]["param_groups"]
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(stored_schedule["last_epoch"])
        stored_schedule["base_lrs"] = list(scheduler.base_lrs)
        stored_schedule["_last_lr"] = [group["lr"] for group in groups]


def logged_step(trainer: L.Trainer) -> int:
    """The TensorBoard step the current batch's metrics go to (Lightning's rule: a logged "step"
    metric, else its count of finished batches)."""
    step = trainer.callback_metrics.get("step")
    return int(step) if step is not None else batches_that_stepped(trainer)


def tensorboard_resume_step(checkpoint: dict) -> Optional[int]:
    """The step from which TensorBoard must forget a killed run's events when resuming ``checkpoint``.

    The checkpointed batch's metrics are written just after the save (which happens in
    on_train_batch_end); everything past them was logged by the run after its checkpoint.
    """
    step = checkpoint.get(LOGGED_STEP_KEY)
    return None if step is None else step + 1


def rng_states() -> dict:
    """The global RNG states, in types a weights-only torch.load accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """Writes the run identity, RNG states and TensorBoard step into checkpoints; restores the RNG.

    The RNG is put back just before the first batch, the point where the saving run stood (loading and
    building the dataloader draw from it). Only rank 0 writes, so every rank restores rank 0's states:
    exact wherever ranks draw alike, as they do here.
    """

    def __init__(self, identity: dict, settings: Optional[dict] = None):
        self.identity, self.settings = identity, settings
        self._pending: Optional[dict] = None
        self._saved = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = self.identity
        if self.settings is not None:
            checkpoint[SETTINGS_KEY] = self.settings
        checkpoint[RNG_KEY] = rng_states()
        checkpoint[LOGGED_STEP_KEY] = logged_step(trainer)
        self._saved = True

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(RNG_KEY)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._saved:  # the checkpointed batch's metrics were written after the save: put them on disk
            for logger in trainer.loggers:
                getattr(logger.experiment, "flush", lambda: None)()
            self._saved = False
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


class KillAtStep(L.Callback):
    """SIGKILL this process at the first batch end at or past ``step`` (no cleanup, like a lost node)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
