"""Next-token training of any backbone on any sequence task; evaluation by greedy generation.

The loss is cross-entropy on the completion only: logits[:, prompt_len - 1 : -1] predict
tokens[:, prompt_len:]. Every ``eval.every_n_steps`` the held-out set is scored three ways:
``token_accuracy`` (teacher-forced next-token accuracy on the completion), ``greedy_accuracy`` (the
answer produced by greedy generation of the whole completion from the prompt alone) and
``chain_accuracy`` (the whole generated completion exact). Solved = greedy accuracy 1.0.

An ensemble (``model.ensemble`` = E) is E copies of the family's network, each with its own init and its
own training and held-out streams (datamodules/stream.py), trained in one process: the loss is the sum of
the members' losses, the gradient is clipped per member, and the optimizer's update is elementwise, so
member m's trajectory is, bit for bit, that of the run ``model.member_offset=m model.ensemble=1``.
Training stops once every member is solved.
"""
import hashlib
import time

import lightning as L
from lightning.fabric.utilities.throughput import get_available_flops
import torch
import torch.nn.functional as F
from torch import nn

from config import Config, model_family
from datamodules.stream import batch_sizes, member_ids
from lightning_modules import stopping
from lightning_modules.family import FLOAT, INDEX, Term
from lightning_modules.logs import log_evaluation, log_training
from lightning_modules.next_token_config import LinearFamily, MLPNextTokenFamily, NextTokenFamily, TransformerFamily
from lightning_modules.optimizers import lightning_optimizers, optimizer
from lightning_modules.training_fit import add_fit_buffers, fit_results, record_fit, train_score_fields
from networks.autoregressive import SPAN_ELEMENTS, linear_next_token, mlp_next_token
from networks.transformer import CoTTransformer

EVAL_CHUNK = 2048  # held-out sequences per forward pass of a next-token evaluation, up to 48 tokens each
EVAL_CHUNK_TOKENS = EVAL_CHUNK * 48  # and at most this many tokens per pass for longer sequences


def eval_chunk(seq_len: int, size: int) -> int:
    """Held-out sequences per evaluation forward pass."""
    return max(1, min(EVAL_CHUNK, EVAL_CHUNK_TOKENS // seq_len, size))


def member_seed(seed: int, member: int) -> int:
    """The init seed of ensemble member ``member``: the run's seed for member 0 (so a single model keeps its
    init), a hash of (seed, member) for the others."""
    if member == 0:
        return seed
    digest = hashlib.sha256(f"paritylab-next-token-init:{seed}:{member}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_backbone(cfg: Config, vocab_size: int, seq_len: int, member: int | None = None) -> nn.Module:
    """The network of ``cfg``'s next-token family for ``member`` (default: the run's first), its init drawn from
    (seed, member) alone (not the global RNG's state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seed(cfg.seed, cfg.model.member_offset if member is None else member))
        return model_family(cfg.model).implementation().network(cfg, vocab_size, seq_len)


def completion_loss(logits: torch.Tensor, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens given everything before them."""
    predicted = logits[:, prompt_len - 1:-1]
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), tokens[:, prompt_len:].reshape(-1))


@torch.no_grad()
def teacher_forced_and_greedy(backbone: nn.Module, sequences: torch.Tensor, prompt_len: int,
                              use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits (B, T, vocab) of ``sequences`` (B, T) and the completion (B, T - prompt_len)
    greedily generated from their prompts alone.

    Both share one forward pass over the sequences: its logit at prompt_len - 1 gives the first generated
    token, and (KV-cached, if the backbone can) its keys of the prompt serve the generation. Generation
    writes position p of the cache before it reads positions <= p, so the teacher's later keys never leak.
    """
    cache = backbone.init_cache(sequences.shape[0], sequences.device) \
        if use_cache and hasattr(backbone, "init_cache") else None
    logits = backbone(sequences) if cache is None else backbone.forward_cached(sequences, cache, 0)
    out = [logits[:, prompt_len - 1].argmax(-1)]
    for pos in range(prompt_len, sequences.shape[1] - 1):
        if cache is None:
            step = backbone(torch.cat([sequences[:, :prompt_len], torch.stack(out, 1)], dim=1))[:, -1]
        else:
            step = backbone.forward_cached(out[-1][:, None], cache, pos)[:, -1]
        out.append(step.argmax(-1))
    return logits, torch.stack(out, 1)


class NextTokenModule(NextTokenFamily, L.LightningModule):
    """Trains a next-token network; each family below names its network."""

    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def build(cls, cfg: Config, task) -> "NextTokenModule":
        backbones = [make_backbone(cfg, task.vocab_size, task.seq_len, m) for m in member_ids(cfg)]
        return cls(cfg, backbones, task.prompt_len, task.seq_len, task.answer_len)

    @staticmethod
    def members_size(cfg: Config) -> tuple[str, int, str]:
        """The ensemble's size as a footprint factor."""
        return "model.ensemble", cfg.model.ensemble, "model.ensemble"

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        layout, e, E = task.layout(cfg.data), cfg.eval, cls.members_size(cfg)
        T = ("seq_len", layout.seq_len, task.size_key)
        terms = [Term("held-out set", [E, ("eval.size", e.size, "eval.size"), T], INDEX),
                 Term("training batch", [E, *batch_sizes(cfg), T], INDEX)]
        if cfg.data.train_size is not None:  # a finite training set: the samples the fit is measured on
            fit = ("min(data.train_size, eval.size)", min(cfg.data.train_size, e.size), "eval.size")
            terms.append(Term("training samples the fit is measured on", [E, fit, T], INDEX))
        return terms

    @staticmethod
    def eval_chunk_term(cfg: Config, seq_len: int) -> tuple[str, int, str]:
        return "eval chunk", eval_chunk(seq_len, cfg.eval.size), "eval.size"

    def summary_fields(self) -> dict:
        return {"model": self.key, "kind": self.cfg.model.kind, "train_path": "autograd"}  # its one path

    def hparam_fields(self) -> dict:
        return {"model": self.key, "kind": self.cfg.model.kind, "parameters": self.member_parameters,
                "ensemble": self.cfg.model.ensemble}

    def __init__(self, cfg: Config, backbones: list[nn.Module], prompt_len: int, seq_len: int, answer_len: int):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.backbones = cfg, nn.ModuleList(backbones)
        self.members = member_ids(cfg)
        if len(backbones) != len(self.members):
            raise ValueError(f"{len(backbones)} networks for the {len(self.members)} members {self.members}")
        self.prompt_len, self.seq_len, self.answer_len = prompt_len, seq_len, answer_len
        self.register_buffer("solved_step", torch.full((len(backbones),), -1, dtype=torch.long))
        self.register_buffer("accuracy", torch.zeros(len(backbones), 3))  # per member: token, greedy, chain
        add_fit_buffers(self, len(backbones), cfg.data.train_size is not None)
        self.train_s, self.train_tokens = 0.0, 0

    @property
    def member_parameters(self) -> int:
        """Parameters of one member's network (every member's is the same)."""
        return sum(p.numel() for p in self.backbones[0].parameters())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (E, B, T, vocab): member e's network on its own rows tokens[e] of tokens (E, B, T)."""
        return torch.stack([net(rows) for net, rows in zip(self.backbones, tokens)])

    def losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """Completion loss (E,) of every member on its own rows of tokens (E, B, T)."""
        return torch.stack([completion_loss(logits, rows, self.prompt_len)
                            for logits, rows in zip(self(tokens), tokens)])

    @staticmethod
    def decay_groups(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """A network's parameters with weight decay (matrices and embeddings) and without (biases, norms)."""
        params = list(net.parameters())
        return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]

    def configure_optimizers(self):
        o = self.cfg.optim
        decay, rest = (sum(group, []) for group in zip(*map(self.decay_groups, self.backbones)))
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return lightning_optimizers(optimizer(groups, o), o, self.cfg.trainer.max_steps, always=True)

    def clip_per_member(self) -> None:
        """Clip each member's gradient norm to optim.grad_clip, over its parameters in the optimizer's order (as
        a lone member's run clips its own)."""
        for net in self.backbones:
            decay, rest = self.decay_groups(net)
            torch.nn.utils.clip_grad_norm_(decay + rest, self.cfg.optim.grad_clip)

    def training_step(self, batch, batch_idx: int) -> None:
        """Run the batch's optimizer steps: batch.tokens is (members, steps, local batch, seq_len)."""
        opt, schedule = self.optimizers(), self.lr_schedulers()
        start = time.perf_counter()
        losses = []
        for j in range(batch.tokens.shape[1]):
            loss = self.losses(batch.tokens[:, j])
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss.sum())  # member m's gradient is that of its own loss
            if self.cfg.optim.grad_clip > 0:
                self.clip_per_member()
            opt.step()
            schedule.step()
            losses.append(loss.detach())
            if stopping.requested():  # cut the batch short at this step
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_s += time.perf_counter() - start
        self.train_tokens += batch.tokens[:, :len(losses)].numel() * self.trainer.world_size
        step = self.trainer.global_step
        log_training(self, torch.stack(losses), step, {"train/lr": schedule.get_last_lr()[0]})  # x-axis: SGD steps
        if step % self.cfg.eval.every_n_steps == 0 or step >= self.cfg.trainer.max_steps:
            self.evaluate(step)

    @torch.no_grad()
    def scores(self, backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """(token, greedy, chain) accuracy of one member's network on held-out sequences (N, seq_len)."""
        P, length = self.prompt_len, self.seq_len - self.prompt_len
        hits = torch.zeros(3, device=tokens.device, dtype=torch.float64)
        for chunk in tokens.split(eval_chunk(self.seq_len, tokens.shape[0])):
            target = chunk[:, P:]
            logits, generated = teacher_forced_and_greedy(backbone, chunk, P)
            hits[0] += (logits[:, P - 1:-1].argmax(-1) == target).sum()
            hits[1] += (generated[:, -self.answer_len:] == target[:, -self.answer_len:]).all(1).sum()
            hits[2] += (generated == target).all(1).sum()
        return (hits / torch.tensor([tokens.shape[0] * length, tokens.shape[0], tokens.shape[0]],
                                    device=tokens.device)).float()

    def measure(self, dm) -> torch.Tensor:
        """(token, greedy, chain) accuracy (E, 3) of every member on its held-out stream, ``dm.eval_set`` on this
        module's device."""
        held_out = dm.eval_set(self.device)
        return torch.stack([self.scores(net, tokens) for net, tokens in zip(self.backbones, held_out)])

    def measure_fit(self, dm) -> torch.Tensor:
        """(token, greedy, chain) accuracy (E, 3) of every member on the part of its finite training set each
        evaluation measures; the greedy accuracy is the fit."""
        subset = dm.train_subset(self.device)
        return torch.stack([self.scores(net, tokens) for net, tokens in zip(self.backbones, subset)])

    def fit_metrics(self, dm) -> dict:
        return train_score_fields(self.measure_fit(dm)[:, 1], "accuracy")

    def metrics(self, accuracy: torch.Tensor) -> dict:
        """The evaluation's summary.json fields, per member for an ensemble, plain values for a single model; the
        final accuracy is the greedy one."""
        token, greedy, chain = (values if len(self.members) > 1 else values[0] for values in accuracy.T.tolist())
        return {"final_accuracy": greedy, "greedy_accuracy": greedy, "token_accuracy": token, "chain_accuracy": chain}

    def evaluate(self, step: int) -> None:
        """Score every member on its held-out stream; record each one's first step of 100% greedy accuracy, and
        stop once every member has one."""
        self.accuracy = self.measure(self.trainer.datamodule)
        newly = (self.accuracy[:, 1] == 1.0) & (self.solved_step < 0)
        self.solved_step[newly] = step
        solved = int((self.solved_step >= 0).sum())
        token, greedy, chain = self.accuracy.T
        fit = {}
        if self.cfg.data.train_size is not None:  # the fit on the finite training set: greedy accuracy of the answer
            on_train = self.measure_fit(self.trainer.datamodule)
            fit = record_fit(self, on_train[:, 1], on_train[:, 1] == 1.0, step, "accuracy")
            fit["train_set/token_accuracy"] = on_train[:, 0].mean()
        log_evaluation(self, {"eval/token_accuracy": token.mean(), "eval/greedy_accuracy": greedy.mean(),
                              "eval/chain_accuracy": chain.mean(), "eval/greedy_accuracy_min": greedy.min(),
                              "eval/members_solved": solved, **fit, "perf/tokens_per_s": self.tokens_per_s}, step)
        if solved == len(self.members):
            self.trainer.should_stop = True

    @property
    def tokens_per_s(self) -> float:
        """Training tokens (all ranks and members, prompt included) per second of optimizer steps, evaluation
        excluded."""
        return self.train_tokens / self.train_s if self.train_s else 0.0

    def results(self) -> dict:
        """summary.json fields: per member for an ensemble, plain values for a single model; ``parameters`` is
        one member's count."""
        solved = [s if s >= 0 else None for s in self.solved_step.tolist()]
        params = self.member_parameters
        out = {"solved_step": solved if len(self.members) > 1 else solved[0], **self.metrics(self.accuracy),
               **fit_results(self, "accuracy"),
               "parameters": params, "tokens_per_s": round(self.tokens_per_s, 1)}
        # Lightning's table of dense peak FLOP/s (TF32 where float32 matmuls may use it); none for CPUs
        peak = get_available_flops(self.device, torch.float32) if self.device.type == "cuda" else None
        if peak:
            out["mfu"] = round(6 * params * self.tokens_per_s / (peak * self.trainer.world_size), 5)
        return out


class TransformerLM(TransformerFamily, NextTokenModule):
    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        m = cfg.model
        return CoTTransformer(vocab_size, seq_len, m.depth, m.d_model, m.heads, m.positional, cfg.kernels.backend)

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        m, T = cfg.model, ("seq_len", task.layout(cfg.data).seq_len, task.size_key)
        depth, D = ("model.depth", m.depth, "model.depth"), ("model.d_model", m.d_model, "model.d_model")
        local, E = batch_sizes(cfg)[1], cls.members_size(cfg)
        return super().footprint(cfg, task) + [
            Term("weights, gradients and Adam state", [("4 x 12", 48, None), E, depth, D, D], FLOAT),
            Term("activations kept for the backward pass", [("16", 16, None), E, local, T, depth, D], FLOAT),
            Term("evaluation pass: KV cache and activations",
                 [("2 x model.depth + 12", 2 * m.depth + 12, "model.depth"), cls.eval_chunk_term(cfg, T[1]), T, D],
                 FLOAT)]


class CausalLinearLM(NextTokenModule):
    """The CausalLinear families (networks/autoregressive.py): their memory is the T(T+1)/2 blocks and their
    optimizer state; a pass adds one span of targets and the per-position activations."""

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        layout = task.layout(cfg.data)
        T, vocab = ("seq_len", layout.seq_len, task.size_key), ("vocab", layout.vocab_size, None)
        pairs = ("T(T+1)/2 position pairs", layout.seq_len * (layout.seq_len + 1) // 2, task.size_key)
        out = (("model.width", cfg.model.width, "model.width") if hasattr(cfg.model, "width")
               else ("vocab", layout.vocab_size, None))
        depth = ("model.depth", cfg.model.depth, "model.depth") if hasattr(cfg.model, "depth") else ("1", 1, None)
        E, local = cls.members_size(cfg), batch_sizes(cfg)[1]
        return super().footprint(cfg, task) + [
            Term("CausalLinear blocks, gradient, Adam state and its step's temporaries",
                 [("6", 6, None), E, pairs, vocab, out], FLOAT),
            Term("one span of targets: its dense piece of blocks, the piece's gradient and the one-hot prefix",
                 [("3 x 2^22", 3 * SPAN_ELEMENTS, None)], FLOAT),
            Term("activations kept for the backward pass", [("2 x depth + 4", 2 * depth[1] + 4, depth[2]), E, local,
                                                           T, out], FLOAT),
            Term("evaluation pass: outputs and activations",
                 [("5", 5, None), cls.eval_chunk_term(cfg, T[1]), T, out], FLOAT)]


class LinearLM(LinearFamily, CausalLinearLM):
    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        return linear_next_token(vocab_size, seq_len)


class MLPLM(MLPNextTokenFamily, CausalLinearLM):
    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        return mlp_next_token(vocab_size, seq_len, cfg.model.width, cfg.model.depth)
