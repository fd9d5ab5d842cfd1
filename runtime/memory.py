"""Will the run fit: its model family's estimate of the largest tensors against the memory where they live.

Checked once a command line is known to be good (train.py, eval.py, sweep.py), never inside ``config.compose``:
a config composed for another machine (a SLURM array) is not measured here.
"""
import os
from typing import Optional

import torch

from config import Config, ConfigError, model_family, task_class
from lightning_modules.family import Term

PROCESS = 2**29  # the process itself: Python, torch and Lightning (~0.5 GiB resident)


def footprint(cfg: Config) -> list[Term]:
    """The largest tensors one process of the run holds at once (its model family's estimate, meant to err high)."""
    return model_family(cfg.model).implementation().footprint(cfg, task_class(cfg.data.task))


def check_memory(cfg: Config) -> None:
    """Refuse a run whose estimated largest tensors exceed the free memory of its device (or host)."""
    free = available_memory(cfg)
    if free is None:
        return
    available, where = free
    terms = footprint(cfg)
    processes = local_processes(cfg) if where.startswith("host") else 1
    total = processes * (PROCESS + sum(term.bytes for term in terms))
    if total <= available:
        return
    worst = max(terms, key=lambda term: term.bytes)
    key = max((k for _, _, k in worst.sizes if k), key=lambda k: growth(cfg, k))
    sizes = " x ".join(f"{name}={size}" if name[0].isalpha() else name for name, size, _ in worst.sizes)
    times = f"{processes} processes on this host; " if processes > 1 else ""
    raise ConfigError(f"{key}: the run needs about {gib(total)} ({times}largest: {worst.what}, {sizes} x "
                      f"{worst.bytes_each} bytes = {gib(worst.bytes)}), more than the {gib(available)} of {where}")


def available_memory(cfg: Config) -> Optional[tuple[int, str]]:
    """(free bytes, where) of the memory the run's tensors live in; None where that cannot be told.

    CUDA runs: the device's free memory (torch.cuda.mem_get_info), if CUDA is available; CPU runs (and
    ``auto`` without CUDA): MemAvailable of /proc/meminfo, else the available pages of os.sysconf.
    """
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda", "auto"):
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            devices = cfg.trainer.devices
            index = devices[index] if isinstance(devices, list) and index < len(devices) else index
            if not isinstance(index, int) or not 0 <= index < torch.cuda.device_count():
                return None
            return torch.cuda.mem_get_info(index)[0], f"free memory of cuda:{index}"
        if accelerator != "auto":
            return None
    elif accelerator != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024, "host memory available (MemAvailable)"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory available (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None


def local_processes(cfg: Config) -> int:
    """Processes of the run on this host (each holds its own copy of the tensors)."""
    devices = cfg.trainer.devices
    return devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1


def growth(cfg: Config, key: str) -> float:
    """How many times its schema default a size key is (which key made a tensor too big); 1 for a key that is
    no number (a circuit's ``data.netlist`` sizes its sequences by naming a file)."""
    section, name = key.split(".")
    node = getattr(cfg, section)
    value, default = getattr(node, name), getattr(type(node)(), name)
    if not isinstance(value, (int, float)) or not isinstance(default, (int, float)):
        return 1.0
    return value / max(default, 1)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
