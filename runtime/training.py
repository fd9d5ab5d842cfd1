"""A run from its checked config: plan it (trainer, directory, resume), build it, fit it, summarize it.

train.py calls ``train(cfg)`` once the command line has passed its checks; this module is where torch and
Lightning load. Only a ConfigError (ours) and Lightning's MisconfigurationException (its documented refusal of
a trainer setting) become the one-line refusal; any other exception is a bug and stays a traceback.
"""
import json
import os
import resource
import shutil
import signal
import statistics
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from config import Config, ConfigError, to_yaml, validate
from lightning_modules import stopping
from lightning_modules.lightning_adapter import set_default_root_dir
from metrics.scaling import final_key
from runtime.callbacks import StepProgressBar, StopOnSignal, Throughput, stopped_by
from runtime.checkpointing import (KILL_AT_STEP_ENV, AtomicCheckpointIO, KillAtStep, ResumeState, adopt_settings,
                                   check_resumable, identity_defaults, load_for_resume, resume_path, run_identity,
                                   run_settings, setting_defaults, tensorboard_resume_step)
from runtime.experiment import build
from runtime.launch import (RankAgreement, check_cluster, check_devices, cluster_plugins, run_digest,
                            shared_run_dir)
from runtime.memory import check_memory
from runtime.run_dirs import (RUN_DIR_ENV, check_free, check_place, claim, make_run_dir, storage_error,
                              write_atomic)


class Plan(NamedTuple):
    """Where a run writes and what it starts from, as every rank agrees."""
    run_dir: Optional[Path]  # None: rank 0 makes a fresh one
    resume: Optional[Path]  # the checkpoint file to continue, or None
    checkpoint: Optional[dict]  # its contents, loaded and checked
    changed: list[str]  # settings a forced resume changes
    identity: dict
    settings: dict


def build_trainer(cfg: Config, callbacks: list) -> L.Trainer:
    """The run's one Trainer. It learns rank and world size here; ``give_run_dir`` hands it its directory."""
    t = cfg.trainer
    # enable_version_counter=False: last.ckpt is overwritten, never joined by last-v1.ckpt (Lightning versions it
    # when the run directory moved since the checkpoint it resumed was written).
    checkpoints = ModelCheckpoint(every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, save_top_k=0,
                                  enable_version_counter=False)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        max_steps=t.max_steps, max_epochs=-1, logger=False, plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        callbacks=[checkpoints, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0)


def give_run_dir(trainer: L.Trainer, run_dir: Path, checkpoint: Optional[dict], resume: Optional[Path]) -> None:
    """Point the trainer's checkpoints, TensorBoard logger and root at ``run_dir``; on resume, hand the checkpoint
    already loaded and checked to its checkpoint IO (read once) and purge TensorBoard's events past it."""
    trainer.checkpoint_callback.dirpath = os.path.realpath(run_dir / "checkpoints")
    set_default_root_dir(trainer, run_dir / "checkpoints")
    trainer.loggers = [TensorBoardLogger(run_dir, name="", version="tb", default_hp_metric=False,
                                         purge_step=tensorboard_resume_step(checkpoint) if checkpoint else None)]
    if checkpoint is not None:
        trainer.strategy.checkpoint_io.preload = (resume, checkpoint)


def plan_run(cfg: Config, trainer: L.Trainer, dm: L.LightningDataModule, model: L.LightningModule) -> Plan:
    """The run directory every rank agrees on, and the checkpoint it resumes (checked against this run)."""
    validate(cfg, world_size=trainer.world_size)
    check_cluster(cfg, trainer)
    run_dir = shared_run_dir(cfg, trainer)
    if run_dir is not None and trainer.is_global_zero:
        check_free(run_dir)
    resume = resume_path(cfg.resume, run_dir)
    identity, settings = run_identity(cfg, dm), run_settings(cfg)
    checkpoint, changed = (load_for_resume(resume, identity, model, cfg.resume_force, settings,  # every rank
                                           identity_defaults(cfg), setting_defaults(cfg))
                           if resume else (None, []))
    if checkpoint is not None:
        check_resumable(checkpoint, resume)
        if checkpoint["global_step"] > cfg.trainer.max_steps:
            raise ConfigError(f"trainer.max_steps: {cfg.trainer.max_steps} is below step {checkpoint['global_step']} "
                              f"of {resume}, which this run continues")
    if changed:  # forced: a checkpoint of another run continues in a fresh directory, never in that run's
        run_dir = shared_run_dir(cfg, trainer, adopt_checkpoint_home=False)
    if run_dir is not None:
        check_place(run_dir)
    return Plan(run_dir, resume, checkpoint, changed, identity, settings)


def train(cfg: Config) -> int:
    """Plan, build, fit and summarize the run of ``cfg``: the exit status (0, 2 for a refusal, 128 + signal)."""
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    torch.manual_seed(cfg.seed)  # inits drawn from the global RNG (torch seeds it randomly) follow the seed
    callbacks = [Throughput(cfg.data.batch_size * cfg.model.ensemble, cfg.eval.every_n_steps), StopOnSignal()]
    callbacks += [StepProgressBar()] if cfg.trainer.progress_bar else []
    try:  # everything that can be checked before a run directory is touched
        check_devices(cfg)
        check_memory(cfg)
        dm, model = build(cfg)
        trainer = build_trainer(cfg, callbacks)
        plan = plan_run(cfg, trainer, dm, model)
    except ConfigError as err:
        return refuse(str(err))
    except MisconfigurationException as err:  # Lightning's refusal of a trainer setting
        return refuse(f"trainer: {str(err).strip().splitlines()[0]}")
    if finished(plan, cfg):
        print(f"run_dir: {plan.run_dir} finished at step {plan.checkpoint['global_step']} (summary.json); "
              "nothing to do")
        return 0
    if stopping.requested():
        return interrupted(stopping.received(), None, 0)
    try:
        return fit(cfg, plan, trainer, dm, model)
    except Exception as err:
        failure = storage_error(err, Path(os.environ.get(RUN_DIR_ENV) or plan.run_dir or "runs"))
        if failure is None:  # not a write that failed: a bug, a traceback
            raise
        leave_process_group()
        return refuse(f"{failure}; checkpoints written before it are intact (resume=auto continues)")


def fit(cfg: Config, plan: Plan, trainer: L.Trainer, dm: L.LightningDataModule, model: L.LightningModule) -> int:
    """Take the run directory (rank 0), fit and write the summary: the exit status."""
    run_dir, lock = plan.run_dir, None
    if trainer.is_global_zero:  # only rank 0 writes to the run directory
        try:
            run_dir, lock = take_run_dir(cfg, plan)
        except ConfigError as err:
            return refuse(str(err))
    if plan.changed:
        adopt_settings(plan.checkpoint, model, plan.changed)
        print(f"resume: continuing with changed settings: {', '.join(plan.changed)}", file=sys.stderr)
    start = f"{plan.resume.resolve()} at step {plan.checkpoint['global_step']}" if plan.checkpoint else "fresh"
    planned = [ResumeState(plan.identity, plan.settings), RankAgreement(run_digest(cfg, plan.identity, run_dir, start))]
    if os.environ.get(KILL_AT_STEP_ENV):  # the resume tests' fault drill: an environment variable, never a key
        planned.append(KillAtStep(int(os.environ[KILL_AT_STEP_ENV])))
    at = trainer.callbacks.index(trainer.checkpoint_callback)  # Lightning runs the checkpoint callback last
    trainer.callbacks[at:at] = planned
    give_run_dir(trainer, run_dir, plan.checkpoint, plan.resume)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=plan.resume)
    except ConfigError as err:  # the ranks disagree (RankAgreement)
        leave_process_group()
        return refuse(str(err))
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    signum = stopped_by(trainer)
    cut_short = trainer.global_step < cfg.trainer.max_steps and not all_solved(model.results()["solved_step"])
    if signum is not None and cut_short:
        return interrupted(signum, last, trainer.global_step, say=trainer.is_global_zero)
    if trainer.is_global_zero:
        summary = summarize(cfg, dm, model, trainer)
        log_hparams(cfg, dm, model, trainer, summary)
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"run_dir: {run_dir}")
        final = final_key(summary)
        print(f"solved_step: {summary['solved_step']}  {final}: {summary[final]}  "
              f"samples/s: {summary['samples_per_s']:.0f}  wall: {summary['train_wall_s']:.1f}s")
    del lock  # held to the end: no second process enters this run directory while it runs
    return 0


def take_run_dir(cfg: Config, plan: Plan):
    """Rank 0: create (or re-enter) the run directory, lock it, write config.yaml; (directory, lock)."""
    run_dir = plan.run_dir or make_run_dir(cfg.experiment, cfg.seed)
    ours = plan.checkpoint is not None and resumes_in(run_dir, plan.resume)
    restart = cfg.resume == "auto" and plan.checkpoint is None and not (run_dir / "summary.json").exists()
    lock = claim(run_dir, resumes_it=ours or restart)
    if restart:  # an attempt that died before its first checkpoint: nothing of it is kept
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    if plan.changed and ours and (run_dir / "config.yaml").exists():  # forced new settings: keep what ran before
        os.replace(run_dir / "config.yaml", run_dir / f"config-to-step-{plan.checkpoint['global_step']}.yaml")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir, lock


def summarize(cfg: Config, dm: L.LightningDataModule, model: L.LightningModule, trainer: L.Trainer) -> dict:
    """summary.json: the run, its problem (the task's fields) and model, and its results."""
    summary = {
        "experiment": cfg.experiment, "seed": cfg.seed, **dm.summary_fields(), **model.summary_fields(),
        "members": getattr(model, "members", [0]), "steps": trainer.global_step,
        **model.results(),
        "samples_per_s": round(float(trainer.callback_metrics["run/samples_per_s"]), 1),
        "train_wall_s": round(float(trainer.callback_metrics["run/train_wall_s"]), 3),
        "world_size": trainer.world_size,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available():
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary


def log_hparams(cfg: Config, dm: L.LightningDataModule, model: L.LightningModule, trainer: L.Trainer,
                summary: dict) -> None:
    """hparams (the task's and the model's, with the optimizer's) and the median solved_step (unsolved members
    count as never) as the metric."""
    solved = summary["solved_step"] if isinstance(summary["solved_step"], list) else [summary["solved_step"]]
    steps = sorted(s if s is not None else float("inf") for s in solved)
    median = statistics.median(steps) if steps else float("inf")
    params = {"experiment": cfg.experiment, "seed": cfg.seed, "batch_size": cfg.data.batch_size, **dm.hparam_fields(),
              **model.hparam_fields(), "optim": cfg.optim.name, "lr": cfg.optim.lr}
    trainer.logger.log_hyperparams(params, {
        "hparams/solved_step": median if median != float("inf") else float("nan"),
        "hparams/solved_fraction": sum(s is not None for s in solved) / len(solved)})
    trainer.logger.finalize("success")


def finished(plan: Plan, cfg: Config) -> bool:
    """Whether the checkpoint resumed is the end of the finished run in the run directory (summary.json written
    at its step), with nothing left to do: its step budget spent, or every member solved."""
    if plan.checkpoint is None or not resumes_in(plan.run_dir, plan.resume):
        return False
    try:
        summary = json.loads((plan.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    step = plan.checkpoint["global_step"]
    return summary.get("steps") == step and (step >= cfg.trainer.max_steps or all_solved(summary.get("solved_step")))


def resumes_in(run_dir: Optional[Path], resume: Optional[Path]) -> bool:
    """Whether ``resume`` is a checkpoint of the run in ``run_dir`` (run_dir/checkpoints/X.ckpt)."""
    return run_dir is not None and resume is not None and resume.resolve().parent.parent == run_dir.resolve()


def all_solved(solved_step) -> bool:
    """Whether a solved_step field (int or None, or a list of them for an ensemble) says every member solved."""
    return all(s is not None for s in solved_step) if isinstance(solved_step, list) else solved_step is not None


def leave_process_group() -> None:
    """Before a refusal ends a rank: no collective's thread left running at exit (it aborts the process)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def refuse(message: str) -> int:
    """The one-line refusal: ``error: message`` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def interrupted(signum: int, checkpoint: Optional[Path], step: int, say: bool = True) -> int:
    """One line on stderr (``say``: rank 0's) and 128 + signal, for a run signal ``signum`` stopped at ``step``."""
    saved = f"checkpoint {checkpoint} at step {step}; resume=auto continues" if checkpoint else "before training"
    if say:
        print(f"stopped by {signal.Signals(signum).name}: {saved}", file=sys.stderr)
    return 128 + signum
