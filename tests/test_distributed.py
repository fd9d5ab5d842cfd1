"""DDP: exact sharding, the same gradients and weights as one process, torchrun "nodes", rank agreement.

Multi-process runs are train.py subprocesses (Lightning's DDP launcher re-executes the entry script;
torchrun starts one process per rank), on this CPU with gloo.
"""
import importlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import ConfigError, compose
from datamodules.parity import ParityTask
from datamodules.stream import Ticket, pm1
from runtime.launch import cluster_plugins, shared_run_dir
from lightning_modules.parity_mlp import ParityMLP
from conftest import ROOT, clean_env, early, finish, start, train, train_all
SHORT = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.max_steps=50", "eval.every_n_steps=50",
         "checkpoint.every_n_steps=50", "eval.size=256"]
COT_OPTIM = ["optim.name=sgd", "optim.lr=0.1"]  # why SGD: see test_ddp_matches_one_process


def torchrun(cwd: Path, launcher: list[str], *args: str) -> subprocess.Popen:
    return start([sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "train.py"), *args], cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 50
    return checkpoint["state_dict"]


def assert_same_weights(a: dict, b: dict) -> float:
    """Every entry within 1e-5 of itself or of its tensor's largest entry; returns the largest difference.

    (The absolute part is for entries near 0: float32 sums in another order differ there by a few ulps
    of the tensor's scale, e.g. 7e-8 on a 0.002 entry of a tensor whose largest entry is 0.28.)
    """
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].double(), b[name].double()
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item()), name
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


# --- the stream rule and the gradient it implies (in process) -----------------------------------
DATAMODULES = {"parity_mlp": ("datamodules.parity", "ParityTask", ["model.ensemble=2"]),
               "cot_parity": ("datamodules.parity", "ParityTask", []),
               "multiply_cot": ("datamodules.multiply", "MultiplyTask", [])}


@pytest.mark.parametrize("experiment", DATAMODULES)
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_partition_the_global_batch(experiment, world_size):
    """Step t's global batch is rank 0's slice, then rank 1's, ...: every sample once, none twice."""
    module, name, extra = DATAMODULES[experiment]
    dm = getattr(importlib.import_module(module), name)(compose([f"experiment={experiment}", "data.batch_size=8",
                                                                   *extra]))
    cpu = torch.device("cpu")
    whole = dm.generate(Ticket(step=5, steps=3, rank=0, world_size=1), cpu)
    axis = 2  # the local-batch axis: both formats are (members, steps, local batch, ...)
    parts = [dm.generate(Ticket(step=5 + t, steps=1, rank=r, world_size=world_size), cpu)
             for t in range(3) for r in range(world_size)]
    for field, expected in zip(whole._fields, whole):
        if isinstance(expected, torch.Tensor):
            joined = torch.cat([getattr(p, field) for p in parts], dim=axis).view(expected.shape)
            assert torch.equal(joined, expected), field
    one_rank = dm.generate(Ticket(step=5, steps=3, rank=1, world_size=world_size), cpu)
    assert torch.equal(one_rank[0], whole[0].narrow(axis, 8 // world_size, 8 // world_size))


def test_averaged_rank_gradients_are_the_global_batch_gradient():
    """DDP averages the ranks' autograd gradients of their local mean loss: that is the global-batch mean's."""
    world = 4
    cfg = compose(["data.n=30", "data.batch_size=64", "model.ensemble=3"])
    dm, model = ParityTask(cfg), ParityMLP(cfg).double()
    batch = dm.generate(Ticket(7, 1, 0, 1), torch.device("cpu"))
    loss, grads = model.loss_and_grads(pm1(batch.x[:, 0]).double(), batch.y[:, 0].double())  # one process
    params = list(model.net.parameters())
    rank_losses, rank_grads = [], []
    for rank in range(world):  # what each DDP rank computes (parity_mlp.training_step, world_size > 1)
        part = dm.generate(Ticket(7, 1, rank, world), torch.device("cpu"))
        local = model.losses(model(pm1(part.x[:, 0]).double()), part.y[:, 0].double())
        rank_grads.append(torch.autograd.grad(local.sum(), params))
        rank_losses.append(local.detach())
    assert torch.allclose(torch.stack(rank_losses).mean(0), loss, rtol=1e-12)
    for i, p in enumerate(params):
        assert torch.allclose(torch.stack([g[i] for g in rank_grads]).mean(0), grads[i], rtol=1e-10, atol=1e-14)


# --- whole runs ------------------------------------------------------------------------------------
EXPERIMENTS = {"parity_mlp": [], "cot_parity": COT_OPTIM}


@early
def one_process(tmp: Path, jobs: int) -> dict:
    """50 steps of each experiment in one process: experiment -> final weights."""
    done = train_all(tmp, {name: [f"experiment={name}", f"run_dir={tmp / name}", *SHORT, *extra]
                           for name, extra in EXPERIMENTS.items()}, jobs)
    for result in done.values():
        assert result.returncode == 0, result.stderr[-2000:]
    return {name: weights(tmp / name) for name in EXPERIMENTS}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_ddp_matches_one_process(tmp_path, one_process, experiment):
    """2 ranks x (global batch / 2) end where 1 process x global batch does.

    The next-token model runs with SGD here: AdamW divides each gradient by its own scale, so in
    coordinates whose exact gradient is 0 (the attention key bias: softmax ignores a constant shift)
    it turns float rounding noise into lr-sized steps, 2e-6 apart after 50 steps (measured), which is
    Adam's sensitivity, not a DDP difference.
    """
    run_dir = tmp_path / "ddp"
    done = train(tmp_path, f"experiment={experiment}", f"run_dir={run_dir}", *SHORT, *EXPERIMENTS[experiment],
                 "trainer.devices=2", "trainer.strategy=ddp")
    assert done.returncode == 0, done.stderr[-2000:]
    diff = assert_same_weights(weights(run_dir), one_process[experiment])
    print(f"{experiment}: DDP 2 ranks vs 1 process, max |weight difference| = {diff:.3g}")


def test_two_torchrun_nodes_match_one_process(tmp_path, one_process):
    """Two torchrun agents on 127.0.0.1 (node ranks 0 and 1, one process each) form one gloo group."""
    port, run_dir = free_port(), tmp_path / "run"
    cwds = [tmp_path / f"node{r}" for r in range(2)]
    nodes = []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir()
        nodes.append(torchrun(cwd, ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                                    "--master_addr=127.0.0.1", f"--master_port={port}"],
                              f"run_dir={run_dir}", *SHORT, "trainer.num_nodes=2", "trainer.devices=1",
                              "trainer.strategy=ddp"))
    done = finish(*nodes)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    diff = assert_same_weights(weights(run_dir), one_process["parity_mlp"])
    print(f"parity_mlp: torchrun 2 nodes vs 1 process, max |weight difference| = {diff:.3g}")
    assert [list(cwd.iterdir()) for cwd in cwds] == [[], []]  # nothing written beside run_dir


def test_ranks_that_disagree_stop_before_training(tmp_path):
    """Node 1 got another seed (so another secret): every rank exits 2 naming the problem."""
    port = free_port()
    nodes = [torchrun(tmp_path, ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                                 f"--master_port={port}"],
                      f"run_dir={tmp_path / 'run'}", *SHORT, f"seed={rank}", "trainer.num_nodes=2",
                      "trainer.strategy=ddp")
             for rank in range(2)]
    for done in finish(*nodes):
        output = done.stdout + done.stderr
        assert "error: config: not every rank has rank 0's config, secret, run_dir and checkpoint" in output, \
            output[-2000:]
        assert "exitcode  : 2" in output, output[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- one run directory for ranks that a launcher starts (in process: a Trainer built as rank 1 sees it) --
LAUNCHER_ENV = {
    "torchrun": {"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
    "slurm": {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"},
}
JOB_VARIABLE = {"torchrun": "TORCHELASTIC_RUN_ID", "slurm": "SLURM_JOB_ID"}


def rank_one_trainer(monkeypatch, launcher: str, job: str):
    import lightning as L
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))  # the Trainer sets it to 1
    for key in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(key)
    for key, value in {**LAUNCHER_ENV[launcher], JOB_VARIABLE[launcher]: job}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        plugins=cluster_plugins())
    assert (trainer.world_size, trainer.global_rank) == (2, 1)
    return trainer


@pytest.mark.parametrize("launcher,job,expected", [("torchrun", "exp7", "torchrun-exp7"),
                                                   ("slurm", "4242", "slurm-4242")])
def test_a_launchers_job_id_names_the_run_dir_on_every_rank(monkeypatch, launcher, job, expected):
    trainer = rank_one_trainer(monkeypatch, launcher, job)
    assert shared_run_dir(compose([]), trainer) == Path("runs/parity_mlp") / expected
    assert shared_run_dir(compose(["run_dir=/data/mine"]), trainer) == Path("/data/mine")
    if launcher == "slurm":  # Lightning requeues the job on the signal that #SBATCH --signal=SIGUSR1@90 sends
        environment = trainer.strategy.cluster_environment
        assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1


def test_torchrun_without_rdzv_id_needs_run_dir(monkeypatch):
    trainer = rank_one_trainer(monkeypatch, "torchrun", "none")  # torchrun's default --rdzv-id
    with pytest.raises(ConfigError, match="run_dir: required when torchrun starts the ranks"):
        shared_run_dir(compose([]), trainer)
    assert shared_run_dir(compose(["run_dir=shared/run"]), trainer) == Path("shared/run")
