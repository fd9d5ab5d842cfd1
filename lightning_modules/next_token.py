"""Next-token training of any backbone on any sequence task; evaluation by greedy generation.

The loss is cross-entropy on the completion only: logits[:, prompt_len - 1 : -1] predict
tokens[:, prompt_len:]. Every ``eval.every_n_steps`` the held-out set is scored three ways:
``token_accuracy`` (teacher-forced next-token accuracy on the completion), ``greedy_accuracy`` (the
answer produced by greedy generation of the whole completion from the prompt alone) and
``chain_accuracy`` (the whole generated completion exact). Solved = greedy accuracy 1.0.
"""
import time

import lightning as L
from lightning.fabric.utilities.throughput import get_available_flops
import torch
import torch.nn.functional as F
from torch import nn

from config import EVAL_CHUNK, FLOAT, INDEX, Config, Term, batch_sizes, need
from lightning_modules.family import ModelFamily, model_family, register_model
from networks.autoregressive import LinearConfig, NextTokenMLPConfig, linear_next_token, mlp_next_token
from networks.transformer import CoTTransformer, TransformerConfig
from lightning_modules.optimizers import lightning_optimizers, optimizer
from runtime import stopping
from runtime.callbacks import log_evaluation, log_training

POSITIONALS = ("learned", "rope", "none")


def make_backbone(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
    """The network of ``cfg``'s next-token family, its init drawn from the seed alone (not the global RNG's state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return model_family(cfg.model).network(cfg, vocab_size, seq_len)


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


class NextTokenModule(ModelFamily, L.LightningModule):
    """Trains a next-token network; each family below names its network and config."""
    format = "sequence"

    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def build(cls, cfg: Config, task) -> "NextTokenModule":
        return cls(cfg, make_backbone(cfg, task.vocab_size, task.seq_len), task.prompt_len, task.seq_len,
                   task.answer_len)

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        m = cfg.model
        need(m.ensemble == 1, "model.ensemble", f"next-token models train one member, got {m.ensemble}")
        need(m.member_offset == 0, "model.member_offset", f"next-token models train member 0, got {m.member_offset}")

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        layout, e = task.layout(cfg.data), cfg.eval
        T = ("seq_len", layout.seq_len, task.size_key)
        return [Term("held-out set", [("eval.size", e.size, "eval.size"), T], INDEX),
                Term("training batch", [*batch_sizes(cfg), T], INDEX)]

    @staticmethod
    def eval_chunk(cfg: Config) -> tuple[str, int, str]:
        return "eval chunk", min(EVAL_CHUNK, cfg.eval.size), "eval.size"

    def summary_fields(self) -> dict:
        return {"model": self.key, "kind": self.cfg.model.kind, "train_path": "autograd"}  # its one path

    def hparam_fields(self) -> dict:
        return {"model": self.key, "kind": self.cfg.model.kind, "parameters": sum(p.numel() for p in self.parameters())}

    def __init__(self, cfg: Config, backbone: nn.Module, prompt_len: int, seq_len: int, answer_len: int):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.backbone = cfg, backbone
        self.prompt_len, self.seq_len, self.answer_len = prompt_len, seq_len, answer_len
        self.register_buffer("solved_step", torch.tensor(-1))
        self.register_buffer("accuracy", torch.zeros(3))  # token, greedy, chain
        self.train_s, self.train_tokens = 0.0, 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone(tokens)

    def configure_optimizers(self):
        o = self.cfg.optim
        decay = [p for p in self.parameters() if p.dim() >= 2]  # matrices and embeddings; no biases, norms
        rest = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return lightning_optimizers(optimizer(groups, o), o, self.cfg.trainer.max_steps, always=True)

    def training_step(self, batch, batch_idx: int) -> None:
        """Run the batch's optimizer steps: batch.tokens is (steps, local batch, seq_len)."""
        opt, schedule = self.optimizers(), self.lr_schedulers()
        start = time.perf_counter()
        losses = []
        for tokens in batch.tokens:
            loss = completion_loss(self.backbone(tokens), tokens, self.prompt_len)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.cfg.optim.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            schedule.step()
            losses.append(loss.detach())
            if stopping.requested():  # cut the batch short at this step
                break
        loss = torch.stack(losses).mean()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_s += time.perf_counter() - start
        self.train_tokens += batch.tokens[:len(losses)].numel() * self.trainer.world_size
        step = self.trainer.global_step
        log_training(self, {"train/loss": loss, "train/lr": schedule.get_last_lr()[0]}, step)  # x-axis: SGD steps
        if step % self.cfg.eval.every_n_steps == 0 or step >= self.cfg.trainer.max_steps:
            self.evaluate(step)

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(token, greedy, chain) accuracy on held-out sequences (N, seq_len)."""
        P, length = self.prompt_len, self.seq_len - self.prompt_len
        hits = torch.zeros(3, device=tokens.device, dtype=torch.float64)
        for chunk in tokens.split(EVAL_CHUNK):
            target = chunk[:, P:]
            logits, generated = teacher_forced_and_greedy(self.backbone, chunk, P)
            hits[0] += (logits[:, P - 1:-1].argmax(-1) == target).sum()
            hits[1] += (generated[:, -self.answer_len:] == target[:, -self.answer_len:]).all(1).sum()
            hits[2] += (generated == target).all(1).sum()
        return (hits / torch.tensor([tokens.shape[0] * length, tokens.shape[0], tokens.shape[0]],
                                    device=tokens.device)).float()

    def measure(self, dm) -> torch.Tensor:
        """(token, greedy, chain) accuracy on ``dm.eval_set``, on this module's device."""
        return self.scores(dm.eval_set(self.device))

    @staticmethod
    def metrics(accuracy: torch.Tensor) -> dict:
        """The evaluation's summary.json fields; the final accuracy is the greedy one."""
        token, greedy, chain = accuracy.tolist()
        return {"final_accuracy": greedy, "greedy_accuracy": greedy, "token_accuracy": token, "chain_accuracy": chain}

    def evaluate(self, step: int) -> None:
        """Score the held-out set; record the first step of 100% greedy accuracy and stop there."""
        self.accuracy = self.measure(self.trainer.datamodule)
        token, greedy, chain = self.accuracy.tolist()
        if greedy == 1.0 and self.solved_step < 0:
            self.solved_step.fill_(step)
        log_evaluation(self, {"eval/token_accuracy": token, "eval/greedy_accuracy": greedy,
                              "eval/chain_accuracy": chain, "perf/tokens_per_s": self.tokens_per_s}, step)
        if self.solved_step >= 0:
            self.trainer.should_stop = True

    @property
    def tokens_per_s(self) -> float:
        """Training tokens (all ranks, prompt included) per second of optimizer steps, evaluation excluded."""
        return self.train_tokens / self.train_s if self.train_s else 0.0

    def results(self) -> dict:
        """summary.json fields."""
        solved = int(self.solved_step)
        params = sum(p.numel() for p in self.backbone.parameters())
        out = {"solved_step": solved if solved >= 0 else None, **self.metrics(self.accuracy), "parameters": params,
               "tokens_per_s": round(self.tokens_per_s, 1)}
        # Lightning's table of dense peak FLOP/s (TF32 where float32 matmuls may use it); none for CPUs
        peak = get_available_flops(self.device, torch.float32) if self.device.type == "cuda" else None
        if peak:
            out["mfu"] = round(6 * params * self.tokens_per_s / (peak * self.trainer.world_size), 5)
        return out


@register_model("next_token", kind="transformer", default=True)
class TransformerLM(NextTokenModule):
    Config = TransformerConfig

    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        return CoTTransformer(cfg.model, vocab_size, seq_len, backend=cfg.kernels.backend)

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        super().validate(cfg, given)
        m = cfg.model
        need(m.positional in POSITIONALS, "model.positional", f"{m.positional!r} is not one of {', '.join(POSITIONALS)}")
        need(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")
        need(m.d_model >= 1, "model.d_model", f"must be >= 1, got {m.d_model}")
        need(m.heads >= 1, "model.heads", f"must be >= 1, got {m.heads}")
        need(m.d_model % m.heads == 0, "model.heads", f"must divide model.d_model ({m.d_model}), got {m.heads}")
        need(m.positional != "rope" or (m.d_model // m.heads) % 2 == 0, "model.positional",
             f"rope needs an even head dim (model.d_model / model.heads), got {m.d_model // m.heads}")

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        m, T = cfg.model, ("seq_len", task.layout(cfg.data).seq_len, task.size_key)
        depth, D = ("model.depth", m.depth, "model.depth"), ("model.d_model", m.d_model, "model.d_model")
        local = batch_sizes(cfg)[1]
        return super().footprint(cfg, task) + [
            Term("weights, gradients and Adam state", [("4 x 12", 48, None), depth, D, D], FLOAT),
            Term("activations kept for the backward pass", [("16", 16, None), local, T, depth, D], FLOAT),
            Term("evaluation pass: KV cache and activations",
                 [("2 x model.depth + 12", 2 * m.depth + 12, "model.depth"), cls.eval_chunk(cfg), T, D], FLOAT)]


class CausalLinearLM(NextTokenModule):
    """The CausalLinear families (networks/autoregressive.py): their memory is the T x T block matrix."""

    @classmethod
    def footprint(cls, cfg: Config, task) -> list[Term]:
        layout = task.layout(cfg.data)
        T, vocab = ("seq_len", layout.seq_len, task.size_key), ("vocab", layout.vocab_size, None)
        out = (("model.width", cfg.model.width, "model.width") if hasattr(cfg.model, "width")
               else ("vocab", layout.vocab_size, None))
        terms = super().footprint(cfg, task) + [
            Term("CausalLinear blocks, gradient and Adam state", [("2", 2, None), T, T, vocab, out], FLOAT),
            Term("assembled CausalLinear matrix, its gradient and the generation cache's copy",
                 [("3", 3, None), T, T, vocab, out], FLOAT),
            Term("evaluation pass: prefix sums and activations", [("5", 5, None), cls.eval_chunk(cfg), T, out], FLOAT)]
        if hasattr(cfg.model, "depth"):
            terms.append(Term("hidden activations", [("2", 2, None), batch_sizes(cfg)[1], T, out,
                                                     ("model.depth", cfg.model.depth, "model.depth")], FLOAT))
        return terms


@register_model("next_token", kind="linear")
class LinearLM(CausalLinearLM):
    Config = LinearConfig

    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        return linear_next_token(cfg.model, vocab_size, seq_len)


@register_model("next_token", kind="mlp")
class MLPLM(CausalLinearLM):
    Config = NextTokenMLPConfig

    @staticmethod
    def network(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
        return mlp_next_token(cfg.model, vocab_size, seq_len)

    @classmethod
    def validate(cls, cfg: Config, given: set[str]) -> None:
        super().validate(cfg, given)
        need(cfg.model.width >= 1, "model.width", f"must be >= 1, got {cfg.model.width}")
        need(cfg.model.depth >= 1, "model.depth", f"must be >= 1, got {cfg.model.depth}")
