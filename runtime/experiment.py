"""An experiment's parts from its config, and a finished run's parts back from its directory.

``build(cfg)`` turns a config into the task's datamodule and the module that trains its model.
``load_run(run_dir)`` rebuilds a run from run_dir/config.yaml and checkpoints/last.ckpt (for a notebook);
``evaluate_run(run_dir, overrides)`` measures it again on its held-out stream and records that (eval.py).

Overrides may change how, and on how much of the held-out stream, a run is evaluated (EVAL_OPTIONS), never
what was trained. The record goes to run_dir/eval.json when no override differs from config.yaml, else to
run_dir/eval-KEY=VALUE[,KEY=VALUE...].json. An existing file that holds the same evaluation is left as it
is; one that holds another (a later checkpoint, numbers from another device) is refused, never overwritten.
"""
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import datamodules  # noqa: F401  (registers every task's declarations: load_run works on its own)
import lightning_modules  # noqa: F401  (and every model family's)
from config import Config, ConfigError, from_dotlist, has_key, model_family, schema_for, task_class, validate
from runtime.checkpointing import (IDENTITY_KEY, SETTINGS_KEY, identity_defaults, identity_differences,
                                   read_checkpoint, run_identity, run_settings, setting_defaults)
from runtime.memory import check_memory
from runtime.run_dirs import RunDirLock, write_atomic

# How and on how many held-out samples a run is evaluated (all of them run options, runtime/checkpointing.py).
EVAL_OPTIONS = ("eval.size", "kernels.backend", "kernels.compile", "trainer.accelerator", "trainer.devices",
                "trainer.cpu_threads")

RETIRED_KEYS = ("trainer.fail_at_step",)  # now the environment variable PARITYLAB_KILL_AT_STEP (a fault drill)


def build(cfg: Config) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The datamodule of ``data.task`` and the module of the model family, through their registries."""
    task = task_class(cfg.data.task).implementation()(cfg)
    return task, model_family(cfg.model).implementation().build(cfg, task)


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, Any]]:
    """The config of the run in ``run_dir`` (its config.yaml) with ``overrides`` of EVAL_OPTIONS keys, and
    those of them that differ from the run's own values, {key: value}."""
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'}")
    if not path.is_file():
        raise ConfigError(f"run_dir: {run_dir} holds no config.yaml (not a run directory)")
    keys = []
    for arg in overrides:
        key, sep, _ = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r}: expected key=value")
        if key not in EVAL_OPTIONS:
            raise ConfigError(f"{key}: fixed by what the run trained; an evaluation overrides only "
                              f"{', '.join(EVAL_OPTIONS)}")
        keys.append(key)
    try:
        saved = OmegaConf.load(path)
        for retired in RETIRED_KEYS:  # a key older runs wrote that no longer exists
            section, _, name = retired.partition(".")
            saved.get(section, {}).pop(name, None)
        cfg = OmegaConf.merge(OmegaConf.structured(schema_for(saved)), saved)
        own: Config = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        why = str(err).splitlines()[0].strip()
        raise ConfigError(f"run_dir: {path} is not a readable run config ({why})") from None
    for key in keys:
        if not has_key(cfg, key):
            raise ConfigError(f"{key}: does not apply to model {model_family(own.model).key}")
    try:
        config: Config = OmegaConf.to_object(OmegaConf.merge(cfg, from_dotlist(list(overrides))))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key + ': ' if key else ''}{str(err).splitlines()[0].strip()}") from None
    validate(config, given=set(keys))
    changed = {key: dotted(config, key) for key in keys if dotted(config, key) != dotted(own, key)}
    return config, changed


def dotted(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def eval_device(cfg: Config) -> torch.device:
    """The one device an evaluation runs on: trainer.accelerator's, the first of trainer.devices on a GPU."""
    accelerator, devices = cfg.trainer.accelerator, cfg.trainer.devices
    if accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise ConfigError(f"trainer.accelerator: an evaluation runs on cpu, gpu or auto, got {accelerator!r}")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {accelerator!r} needs a CUDA GPU and none is available here "
                          "(trainer.accelerator=cpu evaluates on the CPU)")
    index = devices[0] if isinstance(devices, list) and devices else 0
    if not 0 <= index < torch.cuda.device_count():
        raise ConfigError(f"trainer.devices: no CUDA device {index} here ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def restore(run_dir: Path, cfg: Config) -> tuple[L.LightningDataModule, L.LightningModule, int]:
    """The run's datamodule and module with run_dir/checkpoints/last.ckpt's weights, on the evaluation
    device, and the checkpoint's step. The checkpoint must be of config.yaml's problem and settings."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"run_dir: {run_dir} holds no checkpoints/last.ckpt")
    device = eval_device(cfg)
    task, module = build(cfg)
    checkpoint = read_checkpoint(path, key="run_dir")
    expected = {"identity": (checkpoint[IDENTITY_KEY], run_identity(cfg, task)),
                "settings": (checkpoint.get(SETTINGS_KEY, run_settings(cfg)), run_settings(cfg)),
                "shapes": ({name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()},
                           {name: tuple(t.shape) for name, t in module.state_dict().items()})}
    defaults = {"identity": identity_defaults(cfg), "settings": setting_defaults(cfg)}
    for what, (stored, built) in expected.items():
        differ = identity_differences(stored, built, defaults.get(what))
        if differ:
            key = differ[0]
            raise ConfigError(f"run_dir: {path} does not match {run_dir / 'config.yaml'} ({what}: {key} "
                              f"{stored.get(key)!r} in the checkpoint, {built.get(key)!r} in the config"
                              f"{f', and {len(differ) - 1} more' if len(differ) > 1 else ''})")
    module.load_state_dict(checkpoint["state_dict"])
    return task, module.to(device).eval(), int(checkpoint["global_step"])


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, L.LightningDataModule,
                                                                          L.LightningModule]:
    """A run rebuilt from its directory: (config with ``overrides``, datamodule, module holding last.ckpt's
    weights, in eval mode on the evaluation device). ``module.metrics(module.measure(dm))`` evaluates it."""
    cfg, _ = run_config(Path(run_dir), overrides)
    task, module, _ = restore(Path(run_dir), cfg)
    return cfg, task, module


def eval_name(changed: dict[str, Any]) -> str:
    """eval.json for the run's own settings, eval-KEY=VALUE[,...].json for those that differ."""
    if not changed:
        return "eval.json"
    shown = (f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
             for key, value in sorted(changed.items()))
    return f"eval-{','.join(shown)}.json"


def evaluate_run(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[Path, dict, bool]:
    """Evaluate the run in ``run_dir`` at its last checkpoint and record it (module docstring: which file).
    Returns the file, the record and whether it was written now (False: the file already held it).
    Uses trainer.cpu_threads torch threads, as training did."""
    cfg, changed = run_config(run_dir, overrides)
    check_memory(cfg)
    with RunDirLock(run_dir):  # no run trains here meanwhile, and no other evaluation writes
        return record_evaluation(run_dir, cfg, changed)


def record_evaluation(run_dir: Path, cfg: Config, changed: dict[str, Any]) -> tuple[Path, dict, bool]:
    """Measure the run and write its record, unless the file already holds it (evaluate_run, under the lock)."""
    path = run_dir / eval_name(changed)
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    task, module, step = restore(run_dir, cfg)
    record = {"experiment": cfg.experiment, "step": step, "eval_size": cfg.eval.size, "overrides": changed,
              "device": str(module.device), "members": getattr(module, "members", [0]),
              **module.metrics(module.measure(task)),
              **(module.fit_metrics(task) if cfg.data.train_size is not None else {})}
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):
            held = None
        if held == record:
            return path, record, False
        differ = [key for key in record if held.get(key) != record[key]] if isinstance(held, dict) else []
        why = f"differs in {', '.join(differ)}" if differ else "is not an evaluation record"
        raise ConfigError(f"run_dir: {path} holds another evaluation ({why}); move it away to record this one")
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path, record, True
