"""Train one experiment: python train.py [experiment=NAME] [trainer=PRESET] [dotted.key=value ...]

compose config -> build datamodule, module, trainer -> fit -> run_dir/summary.json
"""
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from config import Config, ConfigError, compose, to_yaml, validate
from runtime import stopping
from runtime.experiment import build
from runtime.callbacks import StepProgressBar, Throughput
from runtime.checkpointing import (AtomicCheckpointIO, KillAtStep, ResumeState, adopt_settings, identity_defaults,
                                   load_for_resume, resume_path, run_identity, run_settings, tensorboard_resume_step)
from runtime.launch import (RUN_DIR_ENV, RankAgreement, check_cluster, check_devices, cluster_plugins,
                                      run_digest, shared_run_dir)
from runtime.run_dirs import check_free, check_place, claim, make_run_dir, write_atomic


def quiet_lightning() -> None:
    """Lightning's notices that say nothing about this run; at import, so ddp_spawn workers get it too."""
    for noise in (".*does not have many workers.*", ".*weights_only.*", ".*treespec.*LeafSpec.*",
                  ".*no pre-optimization state was saved.*", ".*dirpath has changed from.*"):
        warnings.filterwarnings("ignore", noise)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_lightning()


def build_trainer(cfg: Config, run_dir: Path, callbacks: list, tb_purge_step: Optional[int] = None,
                  preload: Optional[tuple[Path, dict]] = None) -> L.Trainer:
    """``tb_purge_step``: on resume, the first step to log; TensorBoard hides older events from there on.
    ``preload``: the (path, checkpoint) being resumed, already loaded and checked."""
    t = cfg.trainer
    # enable_version_counter=False: last.ckpt is overwritten, never joined by last-v1.ckpt (Lightning versions it
    # when the run directory moved since the checkpoint it resumed was written).
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint.every_n_steps,
                                  save_last=True, save_top_k=0, enable_version_counter=False)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        max_steps=t.max_steps, max_epochs=-1, logger=TensorBoardLogger(run_dir, name="", version="tb",
                                                                       default_hp_metric=False,
                                                                       purge_step=tb_purge_step),
        plugins=[AtomicCheckpointIO(preload), *cluster_plugins()], default_root_dir=run_dir / "checkpoints",
        callbacks=[checkpoints, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0)


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


def finished(run_dir: Optional[Path], resume: Optional[Path], checkpoint: Optional[dict], cfg: Config) -> bool:
    """Whether ``checkpoint`` is the end of the finished run in ``run_dir`` (summary.json written at its step),
    with nothing left to do: its step budget spent, or every member solved."""
    if checkpoint is None or not resumes_in(run_dir, resume):
        return False
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    step = checkpoint["global_step"]
    return summary.get("steps") == step and (step >= cfg.trainer.max_steps or all_solved(summary.get("solved_step")))


def resumes_in(run_dir: Optional[Path], resume: Optional[Path]) -> bool:
    """Whether ``resume`` is a checkpoint of the run in ``run_dir`` (run_dir/checkpoints/X.ckpt)."""
    return run_dir is not None and resume is not None and resume.resolve().parent.parent == run_dir.resolve()


def all_solved(solved_step) -> bool:
    """Whether a solved_step field (int or None, or a list of them for an ensemble) says every member solved."""
    return all(s is not None for s in solved_step) if isinstance(solved_step, list) else solved_step is not None


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    stopping.install()  # from here on SIGTERM / SIGINT stop the run at a step, with a checkpoint
    try:
        cfg = compose(argv)
    except ConfigError as err:
        return error(str(err))
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    torch.manual_seed(cfg.seed)  # inits drawn from the global RNG (torch seeds it randomly) follow the seed
    try:
        dm, model = build(cfg)
    except ConfigError as err:
        return error(str(err))
    samples_per_step = cfg.data.batch_size * cfg.model.ensemble
    callbacks = [Throughput(samples_per_step, cfg.eval.every_n_steps), stopping.StopOnSignal()]
    callbacks += [StepProgressBar()] if cfg.trainer.progress_bar else []
    try:  # everything that can be checked before a run directory is touched
        check_devices(cfg)
        trainer = build_trainer(cfg, Path("runs/pending"), callbacks)  # learns rank and world size; rebuilt below
        validate(cfg, world_size=trainer.world_size)
        check_cluster(cfg, trainer)
        run_dir = shared_run_dir(cfg, trainer)  # None: rank 0 makes a fresh one
        if run_dir is not None and trainer.is_global_zero:
            check_free(run_dir)
        resume = resume_path(cfg.resume, run_dir)
        identity, settings = run_identity(cfg, dm), run_settings(cfg)
        checkpoint, changed = (load_for_resume(resume, identity, model, cfg.resume_force, settings,  # every rank
                                               identity_defaults(cfg))
                               if resume else (None, []))
        if changed:  # forced: a checkpoint of another run continues in a fresh directory, never in that run's
            run_dir = shared_run_dir(cfg, trainer, adopt_checkpoint_home=False)
        if run_dir is not None:
            check_place(run_dir)
    except ConfigError as err:
        return error(str(err))
    except (ValueError, RuntimeError, TypeError, ImportError, MisconfigurationException) as err:  # Lightning's checks
        return error(f"trainer: {str(err).strip().splitlines()[0]}")
    if finished(run_dir, resume, checkpoint, cfg):
        print(f"run_dir: {run_dir} finished at step {checkpoint['global_step']} (summary.json); nothing to do")
        return 0
    if stopping.requested():
        return interrupted(stopping.received(), None, trainer.global_step)
    lock = None
    if trainer.is_global_zero:  # only rank 0 writes to the run directory
        try:
            run_dir = run_dir or make_run_dir(cfg.experiment, cfg.seed)
            ours = checkpoint is not None and resumes_in(run_dir, resume)
            restart = cfg.resume == "auto" and checkpoint is None and not (run_dir / "summary.json").exists()
            lock = claim(run_dir, resumes_it=ours or restart)
        except ConfigError as err:
            return error(str(err))
        if restart:  # an attempt that died before its first checkpoint: nothing of it is kept
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        if changed and ours and (run_dir / "config.yaml").exists():  # forced new settings: keep what ran before
            os.replace(run_dir / "config.yaml", run_dir / f"config-to-step-{checkpoint['global_step']}.yaml")
        os.environ[RUN_DIR_ENV] = str(run_dir)
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    if changed:
        adopt_settings(checkpoint, model, changed)
        print(f"resume: continuing with changed settings: {', '.join(changed)}", file=sys.stderr)
    start = f"{resume.resolve()} at step {checkpoint['global_step']}" if checkpoint else "fresh"
    callbacks += [ResumeState(identity, settings), RankAgreement(run_digest(cfg, identity, run_dir, start))]
    callbacks += [KillAtStep(cfg.trainer.fail_at_step)] if cfg.trainer.fail_at_step else []
    trainer = build_trainer(cfg, run_dir, callbacks, tensorboard_resume_step(checkpoint) if checkpoint else None,
                            (resume, checkpoint) if checkpoint else None)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
    except ConfigError as err:  # the ranks disagree (RankAgreement)
        return error(str(err))
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    signum = stopping.stopped_by(trainer)
    cut_short = trainer.global_step < cfg.trainer.max_steps and not all_solved(model.results()["solved_step"])
    if signum is not None and cut_short:
        return interrupted(signum, last, trainer.global_step, say=trainer.is_global_zero)
    if trainer.is_global_zero:
        summary = summarize(cfg, dm, model, trainer)
        log_hparams(cfg, dm, model, trainer, summary)
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"run_dir: {run_dir}")
        final = next(key for key in summary if key.startswith("final_"))
        print(f"solved_step: {summary['solved_step']}  {final}: {summary[final]}  "
              f"samples/s: {summary['samples_per_s']:.0f}  wall: {summary['train_wall_s']:.1f}s")
    del lock  # held to the end: no second process enters this run directory while it runs
    return 0


def interrupted(signum: int, checkpoint: Optional[Path], step: int, say: bool = True) -> int:
    """One line on stderr (``say``: rank 0's) and 128 + signal, for a run signal ``signum`` stopped at ``step``."""
    saved = f"checkpoint {checkpoint} at step {step}; resume=auto continues" if checkpoint else "before training"
    if say:
        print(f"stopped by {signal.Signals(signum).name}: {saved}", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
