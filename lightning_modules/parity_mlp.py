"""Two-layer MLP ensembles for k-sparse parity (Barak et al. 2022), trained online by SGD.

An ensemble of E members is held as batched tensors: w1 (E, width, n), b1 (E, width),
w2 (E, width), b2 (E,). Every member has its own init seed and data stream, and the loss is the
sum of the members' mean losses, so each member's gradient, and with an elementwise optimizer
(SGD, Adam) its whole trajectory, is that of a separate run.

The gradient is written out by hand (a two-layer MLP has a five-line backward): on small models
autograd's bookkeeping costs more than the arithmetic. ``test_parity_mlp`` checks it against
autograd for every activation and loss.
"""
import hashlib
import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from config import FLOAT, INDEX, Config, EvalConfig, KernelsConfig, ModelConfig, Term, batch_sizes, need
from datamodules.stream import pm1
from lightning_modules.family import ModelFamily, register_model
from lightning_modules import cuda_graph
from runtime import stopping
from runtime.callbacks import log_evaluation
from metrics.hidden_progress import HiddenProgress


STREAM_IDS = 2**32  # a Philox counter word; member m trains on stream 2m and evaluates on 2m + 1
CHOICES = {"activation": ("relu", "sin", "poly"), "init": ("uniform", "gaussian", "sign", "sparse"),
           "loss": ("hinge", "square", "logistic"), "grad": ("auto", "autograd")}


@dataclass
class MLPConfig(ModelConfig):
    width: int = 100
    activation: str = "relu"  # relu | sin | poly
    power: int = 2  # exponent of the poly activation z**power
    init: str = "uniform"  # uniform (Xavier) | gaussian (Kaiming) | sign | sparse
    init_sparsity: int = 2  # nonzero inputs per neuron for init=sparse
    loss: str = "hinge"  # hinge | square | logistic
    grad: str = "auto"  # auto: an accelerated step where it computes autograd's update | autograd


@dataclass
class MLPEvalConfig(EvalConfig):
    hidden_progress: bool = True  # log the hidden-progress measures (margin, Fourier gap, drift) at each eval


@dataclass
class MLPKernelsConfig(KernelsConfig):
    compile: bool = False  # CPU: data generation and the ReLU/hinge SGD step as C++ (built once, ~40 s; cached)


def member_generator(seed: int, member: int) -> torch.Generator:
    """The init RNG of ensemble member ``member``: a function of (seed, member) only."""
    digest = hashlib.sha256(f"paritylab-init:{seed}:{member}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_member(cfg: Config, member: int) -> tuple[torch.Tensor, ...]:
    """(w1, b1, w2, b2) of one member under ``model.init``."""
    n, width, init = cfg.data.n, cfg.model.width, cfg.model.init
    g = member_generator(cfg.seed, member)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    def signs(shape):
        return torch.randint(0, 2, shape, generator=g).float() * 2 - 1

    if init == "uniform":  # Xavier-uniform weights, PyTorch's default biases
        w1 = uniform((width, n), math.sqrt(6 / (n + width)))
        w2 = uniform((width,), math.sqrt(6 / (width + 1)))
        b1, b2 = uniform((width,), 1 / math.sqrt(n)), uniform((), 1 / math.sqrt(width))
    elif init == "gaussian":  # Kaiming-normal weights, zero biases
        w1 = torch.randn((width, n), generator=g) * math.sqrt(2 / n)
        w2 = torch.randn((width,), generator=g) * math.sqrt(2 / width)
        b1, b2 = torch.zeros(width), torch.zeros(())
    elif init == "sign":
        w1, w2 = signs((width, n)) / math.sqrt(n), signs((width,)) / math.sqrt(width)
        b1, b2 = torch.zeros(width), torch.zeros(())
    else:  # sparse: each neuron starts connected to s random inputs (Edelman et al. 2023)
        s = cfg.model.init_sparsity
        chosen = torch.rand((width, n), generator=g).argsort(dim=1)[:, :s]
        w1 = torch.zeros(width, n).scatter_(1, chosen, signs((width, s)) / math.sqrt(s))
        w2 = signs((width,)) / math.sqrt(width)
        b1, b2 = torch.zeros(width), torch.zeros(())
    return w1, b1, w2, b2


@register_model("mlp")
class ParityMLP(ModelFamily, L.LightningModule):
    format = "classifier"
    Config = MLPConfig
    sections = {"eval": MLPEvalConfig, "kernels": MLPKernelsConfig}

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        m, n = cfg.model, cfg.data.n
        for key, allowed in CHOICES.items():
            need(getattr(m, key) in allowed, f"model.{key}", f"{getattr(m, key)!r} is not one of {', '.join(allowed)}")
        need(m.width >= 1, "model.width", f"must be >= 1, got {m.width}")
        need(m.ensemble >= 1, "model.ensemble", f"must be >= 1, got {m.ensemble}")
        need(m.member_offset >= 0, "model.member_offset", f"must be >= 0, got {m.member_offset}")
        last = STREAM_IDS // 2  # member m's streams 2m and 2m + 1 must be < 2**32
        need(m.member_offset + m.ensemble <= last, "model.member_offset",
             f"members [{m.member_offset}, {m.member_offset + m.ensemble}) need stream ids up to "
             f"{2 * (m.member_offset + m.ensemble) - 1}, past 2**32 - 1: model.member_offset + model.ensemble "
             f"must be <= 2**31")
        need(m.power >= 1, "model.power", f"must be >= 1, got {m.power}")
        need("model.power" not in given or m.activation == "poly", "model.power",
             f"applies to model.activation=poly only, got model.activation={m.activation}")
        need(1 <= m.init_sparsity <= n, "model.init_sparsity", f"must be in [1, data.n], got {m.init_sparsity}")
        need("model.init_sparsity" not in given or m.init == "sparse", "model.init_sparsity",
             f"applies to model.init=sparse only, got model.init={m.init}")

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        d, m, e = cfg.data, cfg.model, cfg.eval
        per_batch = batch_sizes(cfg)
        E, width = ("model.ensemble", m.ensemble, "model.ensemble"), ("model.width", m.width, "model.width")
        n = ("data.n", task.input_size(d), "data.n")
        terms = [Term("first layer, its initial copy, gradient and optimizer state", [("4", 4, None), E, width, n],
                      FLOAT),
                 Term("held-out set, its generation and the Fourier gap's copy",
                      [("3", 3, None), E, ("eval.size", e.size, "eval.size"), n], FLOAT),
                 Term("training batch", [E, *per_batch, n], FLOAT),
                 Term("hidden activations and their gradient", [("2", 2, None), E, per_batch[1], width], FLOAT)]
        if not e.hidden_progress:
            return terms
        sampled = math.comb(d.n, d.k) > 2048 if d.n <= 2048 else d.k < d.n  # C(n, k) >= n for 0 < k < n
        if sampled:  # the Fourier gap's random k-subsets: rand + argsort (metrics/hidden_progress.py)
            terms.append(Term("Fourier-gap subset draws", [("4096", 4096, None), n], FLOAT + INDEX))
        elif d.n <= 16:  # its exact transform over the whole boolean cube
            terms.append(Term("outputs on the boolean cube", [E, ("2**data.n", 2**d.n, "data.n")], 2 * FLOAT))
        return terms

    def summary_fields(self) -> dict:
        return {"model": self.key}

    def hparam_fields(self) -> dict:
        m = self.cfg.model
        return {"model": self.key, "width": m.width, "ensemble": m.ensemble, "activation": m.activation,
                "init": m.init, "loss": m.loss}

    def __init__(self, cfg: Config):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        first = cfg.model.member_offset
        self.members = list(range(first, first + cfg.model.ensemble))
        w1, b1, w2, b2 = (torch.stack(t) for t in zip(*(init_member(cfg, m) for m in self.members)))
        self.w1, self.b1, self.w2, self.b2 = (nn.Parameter(t) for t in (w1, b1, w2, b2))
        self.register_buffer("w1_init", w1.clone())
        self.register_buffer("solved_step", torch.full((len(self.members),), -1, dtype=torch.long))
        self.register_buffer("accuracy", torch.zeros(len(self.members)))
        self.hidden_progress = HiddenProgress(cfg.data.n, cfg.data.k)

    # --- model -------------------------------------------------------------------------------
    def activation(self, z: torch.Tensor) -> torch.Tensor:
        act = self.cfg.model.activation
        return z.relu() if act == "relu" else z.sin() if act == "sin" else z.pow(self.cfg.model.power)

    def activation_grad(self, z: torch.Tensor) -> torch.Tensor:
        act, p = self.cfg.model.activation, self.cfg.model.power
        return (z > 0).to(z.dtype) if act == "relu" else z.cos() if act == "sin" else p * z.pow(p - 1)

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations z and activations h, (E, B, width), for inputs x (E, B, n)."""
        z = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1.transpose(1, 2))
        return z, self.activation(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs f (E, B) for inputs x (E, B, n) in {+1, -1}."""
        _, h = self.hidden(x)
        return torch.baddbmm(self.b2.view(-1, 1, 1), h, self.w2.unsqueeze(-1)).squeeze(-1)

    def outputs(self, x: torch.Tensor, chunk_elements: int = 2**19) -> torch.Tensor:
        """forward() over many samples x (E, N, n), in chunks whose hidden activations stay in cache."""
        rows = max(1, chunk_elements // (x.shape[0] * self.w1.shape[1]))
        return torch.cat([self(part) for part in x.split(rows, dim=1)], dim=1)

    def losses(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member mean loss (E,) of outputs f against labels y in {+1, -1}."""
        return self.losses_and_grad(f, y)[0]

    def losses_and_grad(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean losses (E,) and d(their sum)/df (E, B)."""
        loss, batch = self.cfg.model.loss, f.shape[1]
        if loss == "hinge":
            slack = 1 - y * f
            return slack.relu().mean(1), y * (slack > 0) * (-1 / batch)
        if loss == "square":
            err = f - y
            return err.square().mean(1), err * (2 / batch)
        return nn.functional.softplus(-y * f).mean(1), y * torch.sigmoid(-y * f) * (-1 / batch)

    @torch.no_grad()
    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-member losses and the gradients of their sum w.r.t. (w1, b1, w2, b2)."""
        z, h = self.hidden(x)
        f = torch.baddbmm(self.b2.view(-1, 1, 1), h, self.w2.unsqueeze(-1)).squeeze(-1)
        loss, g = self.losses_and_grad(f, y)  # g: (E, B)
        dz = self.activation_grad(z).mul_(g.unsqueeze(-1)).mul_(self.w2.unsqueeze(1))  # (E, B, width)
        grads = [torch.bmm(dz.transpose(1, 2), x), dz.sum(1),
                 torch.bmm(g.unsqueeze(1), h).squeeze(1), g.sum(1)]
        return loss, grads

    # --- training ----------------------------------------------------------------------------
    def first_layer(self) -> torch.Tensor:
        """[w1^T; b1], (E, n + 1, width): one tensor of which the parameters w1 and b1 are views (set up on
        first use and again after a device move), so one batched matmul with inputs [x, 1] serves both."""
        n = self.w1.shape[2]
        first = getattr(self, "_first", None)
        if first is None or self.w1.data_ptr() != first.data_ptr() or self.b1.data_ptr() != first[:, n].data_ptr():
            first = torch.cat([self.w1.detach().transpose(1, 2), self.b1.detach().unsqueeze(1)], dim=1)
            self.w1.data, self.b1.data = first[:, :n].transpose(1, 2), first[:, n]
            self._first = first
        return first

    @torch.no_grad()
    def plain_sgd_steps(self, xs: torch.Tensor, ys: torch.Tensor, opt) -> torch.Tensor:
        """SGD without momentum or weight decay over xs (E, steps, B, n), +/-1 floats or bits: torch.optim.SGD's
        update p <- p - lr * grad, each applied by the batched matmul that computes grad. Returns losses (steps, E).

        Every buffer and view is made once per call, so that a step is a dozen ATen calls into fixed memory.
        """
        members, steps, batch, n = xs.shape
        first, lr = self.first_layer(), opt.optimizer.param_groups[0]["lr"]
        relu, hinge = self.cfg.model.activation == "relu", self.cfg.model.loss == "hinge"
        if self.cfg.kernels.compile and relu and hinge and xs.device.type == "cpu" and xs.dtype == torch.uint8:
            from lightning_modules import fused_cpu
            ext = fused_cpu.extension()
            if ext is not None:
                return fused_cpu.plain_sgd_steps(ext, first, self.w2.detach(), self.b2.detach(), xs, ys, lr, opt)
        x = ys.new_ones(members, batch, n + 1)  # [x, 1]: its product with first adds b1
        z, dz = ys.new_empty(members, batch, first.shape[2]), ys.new_empty(members, batch, first.shape[2])
        f, g = ys.new_empty(members, 1, batch), ys.new_empty(members, batch)
        w2, b2 = self.w2.detach().unsqueeze(1), self.b2.detach().view(-1, 1, 1)
        inputs, x_t, z_t, f_row, g_col, g_row = x[..., :n], x.transpose(1, 2), z.transpose(1, 2), f.squeeze(1), \
            g.unsqueeze(-1), g.unsqueeze(1)
        bits = not xs.is_floating_point()
        if hinge:  # the hinge gradient is -y / B where the slack 1 - y f is positive: one threshold op a step
            slack, one = ys.new_empty(steps, members, batch), ys.new_ones(())
            scaled_y = (ys * (-1 / batch)).unbind(1)
        else:
            losses = ys.new_empty(steps, members)
        for j, (x_j, y_j) in enumerate(zip(xs.unbind(1), ys.unbind(1))):  # no allocation of batch x width tensors
            inputs.copy_(x_j)
            if bits:  # 1 - 2 bits
                inputs.mul_(-2.0).add_(1.0)
            torch.bmm(x, first, out=z)
            h = z.clamp_min_(0) if relu else self.activation(z)
            torch.baddbmm(b2, w2, z_t if relu else h.transpose(1, 2), out=f)  # w2 h^T: a row per member
            if hinge:
                torch.addcmul(one, y_j, f_row, value=-1, out=slack[j])
                torch.ops.aten.threshold_backward.grad_input(scaled_y[j], slack[j], 0, grad_input=g)
            else:
                losses[j], grad = self.losses_and_grad(f_row, y_j)
                g.copy_(grad)
            torch.mul(g_col, w2, out=dz)  # (E, B, width)
            if relu:
                torch.ops.aten.threshold_backward.grad_input(dz, h, 0, grad_input=dz)  # dz * (z > 0)
            else:
                dz.mul_(self.activation_grad(z))
            opt._on_before_step()  # Lightning counts the step
            w2.baddbmm_(g_row, h, alpha=-lr)
            b2.sub_(g.sum(1).view_as(b2), alpha=lr)
            first.baddbmm_(x_t, dz, alpha=-lr)
            opt._on_after_step()
            if stopping.requested():  # cut the batch short at this step
                break
        return slack[:j + 1].clamp_min_(0).mean(2) if hinge else losses[:j + 1]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name in ("adam", "adamw"):
            adam = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
            return adam(self.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)
        return torch.optim.SGD(self.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               foreach=True)

    def training_step(self, batch, batch_idx: int) -> None:
        """Run the batch's SGD steps: batch.x is (E, steps, local batch, n)."""
        opt = self.optimizers()
        params = [self.w1, self.b1, self.w2, self.b2]
        distributed = self.trainer.world_size > 1
        o = self.cfg.optim
        plain_sgd = o.name == "sgd" and o.momentum == 0 and o.weight_decay == 0 and not distributed
        losses = [cuda_graph.plain_sgd_steps(self, batch.x, batch.y, opt)] if plain_sgd else []  # CUDA: a graph
        for j in range(0 if plain_sgd else batch.x.shape[1]):  # momentum, weight decay, Adam, DDP
            x, y = pm1(batch.x[:, j]), batch.y[:, j]
            if distributed:  # DDP averages autograd gradients across ranks
                loss = self.losses(self(x), y)
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss.sum())
                opt.step()
            else:
                loss, grads = self.loss_and_grads(x, y)
                for p, grad in zip(params, grads):
                    p.grad = grad
                opt._on_before_step()  # Lightning counts the step; its per-step hook dispatch is skipped
                opt.optimizer.step()
                opt._on_after_step()
            losses.append(loss.detach().unsqueeze(0))
            if stopping.requested():
                break
        step = self.trainer.global_step
        self.log("train/loss", torch.cat(losses).mean(), prog_bar=True, on_step=True, sync_dist=False)
        self.log("step", float(step), on_step=True, sync_dist=False)  # x-axis of every logged scalar: SGD steps
        if step % self.cfg.eval.every_n_steps == 0 or step >= self.cfg.trainer.max_steps:
            self.evaluate(step)

    @torch.no_grad()
    def measure(self, dm) -> torch.Tensor:
        """Accuracy (E,) of every member on its held-out stream: ``dm.eval_set`` on this module's device."""
        x, y = dm.eval_set(self.device)
        return (self.outputs(x) * y > 0).float().mean(1)

    def metrics(self, accuracy: torch.Tensor) -> dict:
        """The evaluation's summary.json fields: per member for an ensemble, a plain value for a single model."""
        values = accuracy.tolist()
        return {"final_accuracy": values[0] if len(self.members) == 1 else values}

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """Accuracy of every member on its held-out stream; record first 100% as solved_step."""
        self.accuracy = self.measure(self.trainer.datamodule)
        newly = (self.accuracy == 1.0) & (self.solved_step < 0)
        self.solved_step[newly] = step
        solved = int((self.solved_step >= 0).sum())
        secret, hidden = self.trainer.datamodule.secret, {}
        if self.cfg.eval.hidden_progress:
            x = self.trainer.datamodule.eval_set(self.device)[0]  # cached by the datamodule
            hidden = self.hidden_progress.measure(self.outputs, self.w1, self.w1_init, x[0], secret, step)
        log_evaluation(self, {"eval/accuracy_mean": self.accuracy.mean(), "eval/accuracy_min": self.accuracy.min(),
                              "eval/members_solved": solved, **hidden}, step)
        experiment = getattr(self.logger, "experiment", None)
        if hidden and self.trainer.is_global_zero and hasattr(experiment, "add_image"):
            for member, image in zip(self.members, self.hidden_progress.images(secret)):
                experiment.add_image(f"hidden/column_norms/member_{member}", image, step, dataformats="HWC")
        if solved == len(self.members):
            self.trainer.should_stop = True

    def results(self) -> dict:
        """summary.json fields: per member for an ensemble, plain values for a single model."""
        solved = [s if s >= 0 else None for s in self.solved_step.tolist()]
        return {"solved_step": solved[0] if len(self.members) == 1 else solved, **self.metrics(self.accuracy)}
