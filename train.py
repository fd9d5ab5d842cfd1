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

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from config import Config, ConfigError, compose, to_yaml, validate
from lightning_modules.callbacks import StepProgressBar, Throughput

RUN_DIR_ENV = "PARITYLAB_RUN_DIR"  # passed to the ranks that Lightning's DDP launcher starts


def make_run_dir(cfg: Config) -> Path:
    """The run directory: cfg.run_dir, or a new unique runs/<experiment>/<time>-<seed>."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = Path("runs") / cfg.experiment / f"{stamp}-{cfg.seed}{f'-{attempt}' if attempt else ''}"
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: two runs never share a directory
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run directory under runs/{cfg.experiment}")


def build_trainer(cfg: Config, run_dir: Path, callbacks: list) -> L.Trainer:
    t = cfg.trainer
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint.every_n_steps,
                                  save_last=True, save_top_k=0)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        max_steps=t.max_steps, max_epochs=-1, logger=TensorBoardLogger(run_dir, name="", version="tb",
                                                                       default_hp_metric=False),
        callbacks=[checkpoints, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0)


def build(cfg: Config) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The datamodule and module of an experiment, chosen by model.name and data.task."""
    if cfg.model.name == "mlp":
        from datamodules.parity import ParityDataModule
        from lightning_modules.parity_mlp import ParityMLP
        return ParityDataModule(cfg), ParityMLP(cfg)
    raise ConfigError(f"model.name: {cfg.model.name!r} with data.task {cfg.data.task!r} is not available")


def summarize(cfg: Config, dm: L.LightningDataModule, model: L.LightningModule, trainer: L.Trainer,
              throughput: Throughput) -> dict:
    summary = {
        "experiment": cfg.experiment, "seed": cfg.seed, "secret": getattr(dm, "secret", None),
        "n": cfg.data.n, "k": cfg.data.k, "members": getattr(model, "members", [0]),
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
    for noise in (".*does not have many workers.*", ".*weights_only.*", ".*treespec.*LeafSpec.*"):
        warnings.filterwarnings("ignore", noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        dm, model = build(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples_per_step = cfg.data.batch_size * cfg.model.ensemble
    throughput = Throughput(samples_per_step, cfg.eval.every_n_steps)
    callbacks = [throughput] + ([StepProgressBar()] if cfg.trainer.progress_bar else [])
    run_dir = Path(os.environ.get(RUN_DIR_ENV) or cfg.run_dir or "runs/pending")  # set below on rank 0
    try:
        trainer = build_trainer(cfg, run_dir, callbacks)
        validate(cfg, world_size=trainer.world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:  # Lightning's own check of accelerator/devices/strategy
        print(f"error: trainer: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if trainer.is_global_zero and RUN_DIR_ENV not in os.environ:
        run_dir = make_run_dir(cfg)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        trainer = build_trainer(cfg, run_dir, callbacks)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.resume)
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
