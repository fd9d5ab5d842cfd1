"""Train one experiment: python train.py [experiment=NAME] [trainer=PRESET] [dotted.key=value ...]

compose config -> build datamodule, module, trainer -> fit -> run_dir/summary.json
"""
import json
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from config import Config, ConfigError, compose, to_yaml, validate
from lightning_modules.callbacks import StepProgressBar, Throughput
from lightning_modules.checkpointing import (AtomicCheckpointIO, KillAtStep, ResumeState, load_for_resume,
                                             resume_path, run_identity, tensorboard_resume_step)
from lightning_modules.launch import RUN_DIR_ENV, RankAgreement, cluster_plugins, run_digest, shared_run_dir


def make_run_dir(cfg: Config) -> Path:
    """A new unique run directory runs/<experiment>/<time>-<seed>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = Path("runs") / cfg.experiment / f"{stamp}-{cfg.seed}{f'-{attempt}' if attempt else ''}"
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: two runs never share a directory
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run directory under runs/{cfg.experiment}")


def build_trainer(cfg: Config, run_dir: Path, callbacks: list, tb_purge_step: Optional[int] = None) -> L.Trainer:
    """``tb_purge_step``: on resume, the first step to log; TensorBoard hides older events from there on."""
    t = cfg.trainer
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint.every_n_steps,
                                  save_last=True, save_top_k=0)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        max_steps=t.max_steps, max_epochs=-1, logger=TensorBoardLogger(run_dir, name="", version="tb",
                                                                       default_hp_metric=False,
                                                                       purge_step=tb_purge_step),
        plugins=[AtomicCheckpointIO(), *cluster_plugins()], default_root_dir=run_dir / "checkpoints",
        callbacks=[checkpoints, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0)


def build(cfg: Config) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The datamodule and module of an experiment, chosen by model.name and data.task."""
    if cfg.model.name == "mlp":
        from datamodules.parity import ParityDataModule
        from lightning_modules.parity_mlp import ParityMLP
        return ParityDataModule(cfg), ParityMLP(cfg)
    if cfg.model.name == "next_token" and cfg.data.task == "parity":
        from datamodules.cot import CoTDataModule
        from lightning_modules.next_token import NextTokenModule, make_backbone
        dm = CoTDataModule(cfg)
        backbone = make_backbone(cfg, dm.vocab_size, dm.seq_len)
        return dm, NextTokenModule(cfg, backbone, dm.prompt_len, dm.seq_len, dm.answer_len)
    if cfg.model.name == "next_token" and cfg.data.task == "multiply":
        from datamodules.multiply import MultiplyDataModule
        from lightning_modules.next_token import NextTokenModule, make_backbone
        dm = MultiplyDataModule(cfg)
        backbone = make_backbone(cfg, dm.vocab_size, dm.seq_len)
        return dm, NextTokenModule(cfg, backbone, dm.prompt_len, dm.seq_len, dm.answer_len)
    raise ConfigError(f"model.name: {cfg.model.name!r} with data.task {cfg.data.task!r} is not available")


def summarize(cfg: Config, dm: L.LightningDataModule, model: L.LightningModule, trainer: L.Trainer,
              throughput: Throughput) -> dict:
    problem = {"task": cfg.data.task, "secret": getattr(dm, "secret", None)}  # secret: None for multiply
    if cfg.data.task == "multiply":
        problem["digits"] = cfg.data.digits
    else:
        problem.update(n=cfg.data.n, k=cfg.data.k)
    if cfg.model.name == "next_token":
        problem.update(chain=cfg.data.chain, kind=cfg.model.kind)
    summary = {
        "experiment": cfg.experiment, "seed": cfg.seed, **problem, "members": getattr(model, "members", [0]),
        "steps": trainer.global_step,
        **model.results(),
        "samples_per_s": round(throughput.samples_per_s, 1),
        "train_wall_s": round(throughput.wall_s, 3),
        "world_size": trainer.world_size,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available():
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary


def log_hparams(cfg: Config, trainer: L.Trainer, summary: dict) -> None:
    """hparams with the median solved_step (unsolved members count as never) as the metric."""
    solved = summary["solved_step"] if isinstance(summary["solved_step"], list) else [summary["solved_step"]]
    steps = sorted(s if s is not None else float("inf") for s in solved)
    median = statistics.median(steps) if steps else float("inf")
    params = {"experiment": cfg.experiment, "seed": cfg.seed, "n": cfg.data.n, "k": cfg.data.k,
              "batch_size": cfg.data.batch_size, "noise": cfg.data.noise, "width": cfg.model.width,
              "ensemble": cfg.model.ensemble, "activation": cfg.model.activation, "init": cfg.model.init,
              "loss": cfg.model.loss, "optim": cfg.optim.name, "lr": cfg.optim.lr}
    trainer.logger.log_hyperparams(params, {
        "hparams/solved_step": median if median != float("inf") else float("nan"),
        "hparams/solved_fraction": sum(s is not None for s in solved) / len(solved)})
    trainer.logger.finalize("success")


def main(argv: list[str]) -> int:
    try:
        cfg = compose(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for noise in (".*does not have many workers.*", ".*weights_only.*", ".*treespec.*LeafSpec.*",
                  ".*no pre-optimization state was saved.*"):
        warnings.filterwarnings("ignore", noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    torch.manual_seed(cfg.seed)  # inits drawn from the global RNG (torch seeds it randomly) follow the seed
    try:
        dm, model = build(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples_per_step = cfg.data.batch_size * cfg.model.ensemble
    throughput = Throughput(samples_per_step, cfg.eval.every_n_steps)
    callbacks = [throughput] + ([StepProgressBar()] if cfg.trainer.progress_bar else [])
    try:
        trainer = build_trainer(cfg, Path("runs/pending"), callbacks)  # learns rank and world size; rebuilt below
        validate(cfg, world_size=trainer.world_size)
        run_dir = shared_run_dir(cfg, trainer)  # None: rank 0 makes a fresh one
        resume = resume_path(cfg.resume, run_dir)
        identity = run_identity(cfg, getattr(dm, "secret", None))
        checkpoint = load_for_resume(resume, identity, model, cfg.resume_force) if resume else None  # every rank
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:  # Lightning's own check of accelerator/devices/strategy
        print(f"error: trainer: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if trainer.is_global_zero:  # only rank 0 writes to the run directory
        run_dir = run_dir or make_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    start = f"{resume.resolve()} at step {checkpoint['global_step']}" if checkpoint else "fresh"
    callbacks += [ResumeState(identity), RankAgreement(run_digest(cfg, identity["secret"], run_dir, start))]
    callbacks += [KillAtStep(cfg.trainer.fail_at_step)] if cfg.trainer.fail_at_step else []
    trainer = build_trainer(cfg, run_dir, callbacks, tensorboard_resume_step(checkpoint) if checkpoint else None)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
    except ConfigError as err:  # the ranks disagree (RankAgreement)
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if trainer.is_global_zero:
        summary = summarize(cfg, dm, model, trainer, throughput)
        log_hparams(cfg, trainer, summary)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"run_dir: {run_dir}")
        print(f"solved_step: {summary['solved_step']}  final_accuracy: {summary['final_accuracy']}  "
              f"samples/s: {summary['samples_per_s']:.0f}  wall: {summary['train_wall_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
