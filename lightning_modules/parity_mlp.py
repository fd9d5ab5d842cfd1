"""The parity classifier: trains an MLP ensemble (networks/mlp.py) online on its task's labels.

An ensemble of E members is one batched network; every member has its own init seed and data stream, and
the loss is the sum of the members' mean losses, so each member's gradient, and with an elementwise optimizer
(SGD, Adam) its whole trajectory, is that of a separate run.

Autograd through ``forward`` and ``losses`` is the definition of training (``model.grad=autograd``). With
``model.grad=auto`` an accelerated step runs where it computes that same update: the gradient written out by
hand (a two-layer MLP has a five-line backward; on small models autograd's bookkeeping costs more than the
arithmetic), fused into the plain-SGD update (kernels/mlp_step.py: eagerly, as C++ with kernels.compile, or
replayed as a CUDA graph). They are derived from the network's activation and its derivative
(networks/mlp.py) and ``losses``; a subclass that redefines forward or losses, or another network, trains by
autograd. When fitting starts, the chosen step and autograd through the current forward and losses each take
the first training step on copies of the parameters; where they differ, the run trains by autograd and
says why in its one ``train path:`` line. ``tests/test_parity_mlp.py`` checks each path against autograd.
"""
import math

import lightning as L
import torch
from torch import nn

from config import Config, task_class
from datamodules.stream import ClassifierBatch, Ticket, batch_sizes, pm1
from kernels import mlp_step_cpu, mlp_step_graph
from kernels.mlp_step import UNCOUNTED, Arithmetic, PlainSGD
from lightning_modules import stopping
from lightning_modules.family import FLOAT, INDEX, Term
from lightning_modules.lightning_adapter import StepCounter, step_counter
from lightning_modules.logs import log_evaluation, log_training
from lightning_modules.mlp_config import MLPFamily
from lightning_modules.optimizers import clip_per_member, lightning_optimizers, optimizer, scheduled
from lightning_modules.training_fit import add_fit_buffers, fit_results, record_fit, train_score_fields
from metrics.hidden_progress import EXACT_MAX_N, HiddenProgress
from networks.mlp import MLPEnsemble, mlp_ensemble


PATHS = {  # train_path -> what trains
    "autograd": "autograd through forward and losses",
    "gradient": "hand-written gradient + torch.optim",
    "fused": "hand-written gradient fused into the plain-SGD update",
    "cpp": "hand-written gradient fused into the plain-SGD update, as C++ (kernels.compile)",
    "cuda_graph": "hand-written gradient fused into the plain-SGD update, replayed as a CUDA graph",
}
# check_train_path keeps a step where every weight it leaves is within CHECK_RTOL |w| + CHECK_STEP_TOL max |step|
# (per tensor) of the one autograd leaves. In float32, rounding w - lr grad moves a weight by an ulp or two, and
# summing a batch's gradient in another order moves the step by ~1e-7 of itself (measured); an edited forward or
# loss moves it by a sizeable part of itself. A pre-activation within rounding of ReLU's kink (the paths then part
# ways by one sample's share of the step) fails too: that run trains by autograd, slower, never wrong.
CHECK_RTOL = 2**-21  # four float32 units in the last place
CHECK_STEP_TOL = 1e-4


class ParityMLP(MLPFamily, L.LightningModule):

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        d, m, e = cfg.data, cfg.model, cfg.eval
        per_batch = batch_sizes(cfg)
        E, width = ("model.ensemble", m.ensemble, "model.ensemble"), ("model.width", m.width, "model.width")
        inputs = task.input_size(d)
        n = (task.size_key, inputs, task.size_key)
        terms = [Term("first layer, its initial copy, gradient and optimizer state", [("4", 4, None), E, width, n],
                      FLOAT),
                 Term("held-out set, its generation and the Fourier gap's copy",
                      [("3", 3, None), E, ("eval.size", e.size, "eval.size"), n], FLOAT),
                 Term("training batch", [E, *per_batch, n], FLOAT),
                 Term("hidden activations and their gradient", [("2", 2, None), E, per_batch[1], width], FLOAT)]
        if d.train_size is not None:  # a finite training set: the fit's samples and each batch's epoch order
            fit = ("min(data.train_size, eval.size)", min(d.train_size, e.size), "eval.size")
            terms += [Term("training samples the fit is measured on", [E, fit, n], FLOAT),
                      Term("epoch order: indices and Feistel words", [("8", 8, None), E, *per_batch], INDEX)]
        if not getattr(e, "hidden_progress", False):
            return terms
        k = task.secret_size(d)
        sampled = math.comb(inputs, k) > 2048 if inputs <= 2048 else k < inputs  # C(n, k) >= n for 0 < k < n
        if sampled:  # the Fourier gap's random k-subsets: rand + argsort (metrics/hidden_progress.py)
            terms.append(Term("Fourier-gap subset draws", [("4096", 4096, None), n], FLOAT + INDEX))
        if inputs <= EXACT_MAX_N:  # its exact transform over the whole boolean cube
            cube = (f"2**{task.size_key}", 2**inputs, task.size_key)
            terms.append(Term("outputs on the boolean cube", [E, cube], 2 * FLOAT))
        else:  # the characters of the scored subsets on the held-out samples, kept across evaluations
            scored = 1 + 2048 if sampled else math.comb(inputs, k)  # the secret's and the others'
            terms.append(Term("Fourier-gap characters", [("subsets", scored, task.size_key),
                                                         ("eval.size", e.size, "eval.size")], FLOAT))
        return terms

    def summary_fields(self) -> dict:
        return {"model": self.key, "train_path": self.train_path}

    def hparam_fields(self) -> dict:
        m = self.cfg.model
        return {"model": self.key, "width": m.width, "ensemble": m.ensemble, "activation": m.activation,
                "init": m.init, "loss": m.loss, "train_path": self.train_path}

    @classmethod
    def build(cls, cfg: Config, task) -> "ParityMLP":
        task.compiled = cfg.kernels.compile  # the C++ data generation, where the task has one
        return cls(cfg)

    def __init__(self, cfg: Config):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        m, task = cfg.model, task_class(cfg.data.task)
        self.members = list(range(m.member_offset, m.member_offset + m.ensemble))
        self.inputs = task.input_size(cfg.data)
        self.net = mlp_ensemble(cfg.seed, self.members, self.inputs, m.width, m.activation, m.power, m.init,
                                m.init_sparsity)
        self.register_buffer("w1_init", self.net.w1.detach().clone())
        self.register_buffer("solved_step", torch.full((len(self.members),), -1, dtype=torch.long))
        self.register_buffer("score", torch.zeros(len(self.members)))  # held-out, the task's measure (Task.score)
        self.score_name = task.score_name
        add_fit_buffers(self, len(self.members), cfg.data.train_size is not None)
        # the hidden-progress measures, where the task declares them (eval.hidden_progress exists only there)
        self.hidden_progress = (HiddenProgress(self.inputs, task.secret_size(cfg.data))
                                if getattr(cfg.eval, "hidden_progress", False) else None)
        self.train_path = None  # chosen when fitting starts (choose_train_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs f (E, B) for inputs x (E, B, n) in {+1, -1}."""
        return self.net(x)

    def losses(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member mean loss (E,) of outputs f against labels y in {+1, -1} (square loss: any real targets)."""
        loss = self.cfg.model.loss
        if loss == "hinge":
            return (1 - y * f).relu().mean(1)
        if loss == "square":
            return (f - y).square().mean(1)
        return nn.functional.softplus(-y * f).mean(1)

    def outputs(self, x: torch.Tensor, chunk_elements: int = 2**19) -> torch.Tensor:
        """forward() over many samples x (E, N, n), in chunks whose hidden activations stay in cache."""
        rows = max(1, chunk_elements // (x.shape[0] * self.net.w1.shape[1]))
        return torch.cat([self(part) for part in x.split(rows, dim=1)], dim=1)

    # --- accelerated steps: the hand-written gradient of forward and losses ---------------------
    def derived_from_forward(self) -> bool:
        """Whether this module computes the forward and loss the hand-written gradient was derived from (and is
        tested against): a subclass redefining forward or losses, or another network, does not."""
        return (type(self).forward is ParityMLP.forward and type(self).losses is ParityMLP.losses
                and type(self.net) is MLPEnsemble)

    def choose_train_path(self, device: torch.device, world_size: int) -> str:
        """The fastest step that computes autograd's update for this configuration (PATHS)."""
        m, o = self.cfg.model, self.cfg.optim
        if m.grad == "autograd" or world_size > 1 or not self.derived_from_forward():  # DDP reduces autograd's
            return "autograd"
        if o.name != "sgd" or o.momentum or o.weight_decay or o.grad_clip or scheduled(o):
            return "gradient"
        if mlp_step_graph.uses_graph(device):
            return "cuda_graph"
        if self.cfg.kernels.compile and device.type == "cpu" and m.activation == "relu" and m.loss == "hinge":
            if mlp_step_cpu.extension() is not None:  # else one warning, and the eager fused step
                return "cpp"
        return "fused"

    def losses_and_grad(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """losses(f, y) and d(their sum)/df (E, B), written out by hand."""
        loss, batch = self.cfg.model.loss, f.shape[1]
        if loss == "hinge":
            grad = y * (1 - y * f > 0) * (-1 / batch)
        elif loss == "square":
            grad = (f - y) * (2 / batch)
        else:
            grad = y * torch.sigmoid(-y * f) * (-1 / batch)
        return self.losses(f, y), grad

    @torch.no_grad()
    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-member losses and the gradients of their sum w.r.t. the network's (w1, b1, w2, b2)."""
        net = self.net
        z = net.pre_activations(x)
        h = net.act(z)
        loss, g = self.losses_and_grad(net.readout(h), y)  # g: (E, B)
        dz = net.act_backward_(g.unsqueeze(-1) * net.w2.unsqueeze(1), z, h)  # (E, B, width)
        grads = [torch.bmm(dz.transpose(1, 2), x), dz.sum(1),
                 torch.bmm(g.unsqueeze(1), h).squeeze(1), g.sum(1)]
        return loss, grads

    # --- training ----------------------------------------------------------------------------
    def first_layer(self) -> torch.Tensor:
        """[w1^T; b1], (E, n + 1, width): one tensor of which the parameters w1 and b1 are views (set up on
        first use and again after a device move), so one batched matmul with inputs [x, 1] serves both."""
        w1, b1 = self.net.w1, self.net.b1
        n = w1.shape[2]
        first = getattr(self, "_first", None)
        if first is None or w1.data_ptr() != first.data_ptr() or b1.data_ptr() != first[:, n].data_ptr():
            first = torch.cat([w1.detach().transpose(1, 2), b1.detach().unsqueeze(1)], dim=1)
            w1.data, b1.data = first[:, :n].transpose(1, 2), first[:, n]
            self._first = first
        return first

    def plain_sgd(self, path: str = "fused") -> PlainSGD:
        """The accelerated plain-SGD step of ``path`` (kernels/mlp_step.py) for this network and loss, made once."""
        steps = self.__dict__.setdefault("_plain_sgd", {})
        if path not in steps:
            hinge = self.cfg.model.loss == "hinge"
            steps[path] = PlainSGD(path, Arithmetic(self.net.act, self.net.act_backward_, self.losses_and_grad, hinge))
        return steps[path]

    def plain_sgd_steps(self, xs: torch.Tensor, ys: torch.Tensor, lr: float, count: StepCounter = UNCOUNTED,
                        path: str = "fused") -> torch.Tensor:
        """SGD without momentum or weight decay over xs (E, steps, B, n), +/-1 floats or bits, on ``path``; a stop
        signal cuts the batch short. Returns losses (steps, E)."""
        params = self.first_layer(), self.net.w2.detach(), self.net.b2.detach()
        return self.plain_sgd(path)(params, xs, ys, lr, count, stopping.requested)

    def check_train_path(self, path: str, batch: ClassifierBatch) -> str | None:
        """Why the accelerated ``path`` does not take autograd's step through the current forward and losses on the
        batch's first SGD step, or None where it does. Both run on copies: the parameters stay as they are."""
        x, y = batch.x[:, :1], batch.y[:, :1]
        before = [p.detach().clone() for p in self.net.parameters()]  # w1, b1, w2, b2
        leaves = [p.clone().requires_grad_() for p in before]
        with torch.enable_grad():
            names = [f"net.{name}" for name, _ in self.net.named_parameters()]
            f = torch.func.functional_call(self, dict(zip(names, leaves)), (pm1(x[:, 0]),))
            grads = torch.autograd.grad(self.losses(f, y[:, 0]).sum(), leaves)
        if path == "gradient":  # torch.optim steps on either path: compare the gradients it is given
            fast, auto = self.loss_and_grads(pm1(x[:, 0]), y[:, 0])[1], grads
            before = [torch.zeros_like(g) for g in grads]
        else:  # autograd + torch.optim.SGD, as model.grad=autograd trains, against the fused step
            for p, g in zip(leaves, grads):
                p.grad = g
            optimizer(leaves, self.cfg.optim).step()
            auto = [p.detach() for p in leaves]
            w1, b1, w2, b2 = (p.clone() for p in before)
            first = torch.cat([w1.transpose(1, 2), b1.unsqueeze(1)], dim=1)
            sgd = self.plain_sgd(path)
            step = sgd.eager if path == "cuda_graph" else sgd  # a graph replays the eager step's kernels
            step((first, w2, b2), x, y, self.cfg.optim.lr)
            fast = [first[:, :-1].transpose(1, 2), first[:, -1], w2, b2]
        agree, worst = True, 0.0
        for a, b, b0 in zip(fast, auto, before):
            error = (a - b).abs()
            agree &= bool((error <= CHECK_RTOL * b.abs() + CHECK_STEP_TOL * (b - b0).abs().max()).all())
            worst = max(worst, float(error.max()))
        what = "grad" if path == "gradient" else "w"
        return None if agree else (f"the {path} step differs from autograd through the current forward and losses: "
                                   f"max |d{what}| = {worst:.1e}")

    def configure_optimizers(self):
        return lightning_optimizers(optimizer(self.parameters(), self.cfg.optim), self.cfg.optim,
                                    self.cfg.trainer.max_steps)

    def on_fit_start(self) -> None:
        """Choose the train path and check it on the first training step's batch; make the held-out set (and what
        the measures keep of it) before training starts, as a dataset would be, so that the first evaluation does
        not pay for it."""
        dm, path, why = self.trainer.datamodule, self.choose_train_path(self.device, self.trainer.world_size), None
        if path != "autograd":
            why = self.check_train_path(path, dm.generate(Ticket(0, 1, 0, 1), self.device))
        self.train_path = "autograd" if why else path
        x = dm.eval_set(self.device)[0]
        if self.hidden_progress is not None and self.inputs > EXACT_MAX_N:
            self.hidden_progress.fourier.characters(x[0], dm.secret)
        if self.logger is not None:
            self.logger.experiment  # noqa: B018 (TensorBoard's writer opens its event file here, not in the first step)
        if self.trainer.is_global_zero:
            print(f"train path: {self.train_path} ({why or PATHS[self.train_path]})", flush=True)

    def training_step(self, batch, batch_idx: int) -> None:
        """Run the batch's SGD steps on its train path: batch.x is (E, steps, local batch, n)."""
        opt, path = self.optimizers(), self.train_path
        count = step_counter(opt)
        if path in ("fused", "cpp", "cuda_graph"):
            lr = opt.optimizer.param_groups[0]["lr"]
            losses = [self.plain_sgd_steps(batch.x, batch.y, lr, count, path)]
        else:
            losses = self.optimizer_steps(batch, opt, count)
        step = self.trainer.global_step
        log_training(self, torch.cat(losses), step)  # x-axis of every logged scalar: SGD steps
        if step % self.cfg.eval.every_n_steps == 0 or step >= self.cfg.trainer.max_steps:
            self.evaluate(step)

    def optimizer_steps(self, batch, opt, count: StepCounter) -> list[torch.Tensor]:
        """The batch's steps of torch.optim on autograd's gradients or the hand-written ones; losses (1, E) each."""
        o, params = self.cfg.optim, list(self.net.parameters())
        schedule = self.lr_schedulers() if scheduled(o) else None
        losses = []
        for j in range(batch.x.shape[1]):
            x, y = pm1(batch.x[:, j]), batch.y[:, j]
            if self.train_path == "autograd":
                loss = self.losses(self(x), y)
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss.sum())  # under DDP: the ranks' gradients averaged
                grads = [p.grad for p in params]
            else:
                loss, grads = self.loss_and_grads(x, y)
                for p, grad in zip(params, grads):
                    p.grad = grad
            if o.grad_clip:
                clip_per_member(grads, o.grad_clip)
            count.before()
            opt.optimizer.step()
            count.after()
            if schedule is not None:
                schedule.step()
            losses.append(loss.detach().unsqueeze(0))
            if stopping.requested():
                break
        return losses

    @torch.no_grad()
    def measure(self, dm) -> torch.Tensor:
        """The task's score (E,) of every member on its held-out stream: ``dm.eval_set`` on this module's device."""
        return self.held_out(dm)[0]

    def held_out(self, dm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score (E,), whether solved (E,) and outputs (E, N) of every member on its held-out stream."""
        x, y = dm.eval_set(self.device)
        f = self.outputs(x)
        return *dm.score(f, y), f

    @torch.no_grad()
    def measure_fit(self, dm) -> tuple[torch.Tensor, torch.Tensor]:
        """Score (E,) of every member on the part of its finite training set each evaluation measures, and
        whether it fits that part (the held-out score's solved test)."""
        x, y = dm.train_subset(self.device)
        return dm.score(self.outputs(x), y)

    def fit_metrics(self, dm) -> dict:
        return train_score_fields(self.measure_fit(dm)[0], self.score_name)

    def metrics(self, score: torch.Tensor) -> dict:
        """The evaluation's summary.json field final_<score name> (final_accuracy for labels): per member for an
        ensemble, a plain value for a single model."""
        values = score.tolist()
        return {f"final_{self.score_name}": values[0] if len(self.members) == 1 else values}

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """The task's score of every member on its held-out stream; record the first solved one as solved_step."""
        dm = self.trainer.datamodule
        self.score, solved_now, outputs = self.held_out(dm)
        newly = solved_now & (self.solved_step < 0)
        self.solved_step[newly] = step
        solved = int((self.solved_step >= 0).sum())
        secret, hidden, fit = dm.secret, {}, {}
        if self.cfg.data.train_size is not None:  # the fit on the finite training set
            fit = record_fit(self, *self.measure_fit(dm), step, self.score_name)
        if self.hidden_progress is not None:
            x = self.trainer.datamodule.eval_set(self.device)[0]  # cached by the datamodule
            # the Fourier gap scores every member on member 0's held-out samples: a lone member's are its own
            hidden = self.hidden_progress.measure(self.outputs, self.net.w1, self.w1_init, x[0], secret, step,
                                                  outputs if len(self.members) == 1 else None)
        name = self.score_name
        log_evaluation(self, {f"eval/{name}_mean": self.score.mean(), f"eval/{name}_min": self.score.min(),
                              f"eval/{name}_max": self.score.max(),
                              "eval/members_solved": solved, **fit, **hidden}, step)
        experiment = getattr(self.logger, "experiment", None)
        if hidden and self.trainer.is_global_zero and hasattr(experiment, "add_image"):
            for member, image in zip(self.members, self.hidden_progress.images(secret)):
                experiment.add_image(f"hidden/column_norms/member_{member}", image, step, dataformats="HWC")
        if solved == len(self.members):
            self.trainer.should_stop = True

    def results(self) -> dict:
        """summary.json fields: per member for an ensemble, plain values for a single model."""
        solved = [s if s >= 0 else None for s in self.solved_step.tolist()]
        return {"solved_step": solved[0] if len(self.members) == 1 else solved, **self.metrics(self.score),
                **fit_results(self, self.score_name)}
