"""How ranks started by Lightning, torchrun or SLURM agree on one run (docs/multinode.md).

* Run directory, the first that applies: ``run_dir=...``; the one Lightning's own DDP launcher hands
  its child processes (``PARITYLAB_RUN_DIR``); for ``resume=<run>/checkpoints/X.ckpt``, that run; one
  named by the launcher's job id, ``runs/<experiment>/slurm-<SLURM_JOB_ID>`` or
  ``runs/<experiment>/torchrun-<rdzv id>``, which every rank derives alike and a requeued job finds
  again. Ranks that torchrun starts without ``--rdzv-id`` have no shared name: ``run_dir`` is then
  required. Otherwise (one process, or Lightning's launcher) rank 0 makes a fresh unique one.
* SLURM: Lightning's ``SLURMEnvironment`` requeues the job on SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``).
* ``RankAgreement`` checks, before training, that every rank has the same config, secret, run_dir and
  starting checkpoint (ranks that saw different files under resume=auto would train apart).
"""
import hashlib
import os
import signal
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from config import Config, ConfigError, to_yaml
from runtime.run_dirs import RUN_DIR_ENV


def launcher_job_id() -> Optional[str]:
    """A name for this job that every rank shares: the SLURM job or the torchrun rendezvous id."""
    if SLURMEnvironment.detect():
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
        return f"slurm-{job}" if job else None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"torchrun-{run_id}" if run_id not in ("", "none") else None


def checkpoint_run_dir(path: Path) -> Optional[Path]:
    """The run directory a checkpoint was saved in (<run_dir>/checkpoints/X.ckpt), if it is one."""
    run_dir = path.parent.parent
    return run_dir if path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file() else None


def shared_run_dir(cfg: Config, trainer: L.Trainer, adopt_checkpoint_home: bool = True) -> Optional[Path]:
    """The run directory all ranks agree on, or None where rank 0 alone may pick a fresh one.

    ``adopt_checkpoint_home=False`` (a forced resume of another run's checkpoint): never that run's directory.
    """
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if adopt_checkpoint_home and cfg.resume not in (None, "auto") and (home := checkpoint_run_dir(Path(cfg.resume))):
        return home
    job = launcher_job_id()
    if job:
        return Path("runs") / cfg.experiment / job
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size > 1 and environment is not None and environment.creates_processes_externally:
        raise ConfigError("run_dir: required when torchrun starts the ranks without --rdzv-id "
                          "(every rank must name the same directory; see docs/multinode.md)")
    return None


def check_devices(cfg: Config) -> None:
    """Refuse, before Lightning sees them, device requests this machine cannot meet."""
    t = cfg.trainer
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {t.accelerator!r} needs a CUDA GPU and none is available here "
                          "(trainer=cpu trains on the CPU)")
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if isinstance(t.devices, list) and on_cpu:
        raise ConfigError(f"trainer.devices: a CPU run takes a count of processes, not the device ids "
                          f"{list(t.devices)}")


def check_cluster(cfg: Config, trainer: L.Trainer) -> None:
    """Refuse trainer.num_nodes > 1 where nothing tells the ranks where their peers are (it would hang)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if cfg.trainer.num_nodes == 1 or environment is None or environment.creates_processes_externally:
        return
    if not all(os.environ.get(name) for name in ("MASTER_ADDR", "NODE_RANK")):
        raise ConfigError(f"trainer.num_nodes: {cfg.trainer.num_nodes} nodes need a cluster launcher (torchrun or "
                          "SLURM srun), or MASTER_ADDR, MASTER_PORT and NODE_RANK set on every node")


def cluster_plugins() -> list:
    """SLURM: requeue the job on SIGUSR1, sent by ``#SBATCH --signal=SIGUSR1@90`` before the time limit."""
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)]
    return []


def run_digest(cfg: Config, identity: dict, run_dir: Path, start: str) -> int:
    """A 63-bit fingerprint of what every rank must share; ``start``: the checkpoint and step, or fresh."""
    text = f"{to_yaml(cfg)}\nidentity: {identity}\nrun_dir: {run_dir.resolve()}\nstart: {start}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class RankAgreement(L.Callback):
    """Before training, every rank compares its run digest with rank 0's; any mismatch stops every rank."""

    def __init__(self, digest: int):
        self.digest = digest

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        same = trainer.strategy.broadcast(self.digest, src=0) == self.digest
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise ConfigError(f"config: not every rank has rank 0's config, secret, run_dir and checkpoint (rank "
                              f"{trainer.global_rank}: {'same' if same else 'different'}); "
                              "start every rank with the same arguments")
