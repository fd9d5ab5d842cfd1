"""Next-token training of any backbone on any sequence task; evaluation by greedy generation.

The loss is cross-entropy on the completion only: logits[:, prompt_len - 1 : -1] predict
tokens[:, prompt_len:]. Every ``eval.every_n_steps`` the held-out set is scored three ways:
``token_accuracy`` (teacher-forced next-token accuracy on the completion), ``greedy_accuracy`` (the
answer produced by greedy generation of the whole completion from the prompt alone) and
``chain_accuracy`` (the whole generated completion exact). Solved = greedy accuracy 1.0.
"""
import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from runtime import stopping
from runtime.callbacks import log_evaluation

EVAL_CHUNK = 2048  # held-out prompts per forward pass
# Dense FLOP/s by device name (first match wins): (float32 on CUDA cores, TF32 tensor cores).
PEAK_FLOPS = {
    "H100 PCIe": (51.2e12, 378e12),
    "H100": (66.9e12, 494.7e12),
    "H200": (66.9e12, 494.7e12),
    "A100": (19.5e12, 156e12),
}


def make_backbone(cfg: Config, vocab_size: int, seq_len: int) -> nn.Module:
    """The sequence model of ``model.kind``, its init drawn from the seed alone (not the global RNG's state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model.kind == "transformer":
            from networks.transformer import CoTTransformer
            return CoTTransformer(cfg.model, vocab_size, seq_len, backend=cfg.kernels.backend)
        from networks import autoregressive
        return autoregressive.make_backbone(cfg, vocab_size, seq_len)


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


def peak_flops(device: torch.device) -> float | None:
    """The device's dense peak FLOP/s for float32 training, or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return next((peaks[tf32] for key, peaks in PEAK_FLOPS.items() if key in name), None)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class NextTokenModule(L.LightningModule):
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
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        else:
            opt = (torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam)(groups, lr=o.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, o.warmup_steps, self.cfg.trainer.max_steps, o.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

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
        self.log_dict({"train/loss": loss, "train/lr": schedule.get_last_lr()[0],
                       "step": float(step)}, on_step=True, prog_bar=False)  # "step": the x-axis is SGD steps
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

    def evaluate(self, step: int) -> None:
        """Score the held-out set; record the first step of 100% greedy accuracy and stop there."""
        self.accuracy = self.scores(self.trainer.datamodule.eval_set(self.device))
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
        token, greedy, chain = self.accuracy.tolist()
        solved = int(self.solved_step)
        params = sum(p.numel() for p in self.backbone.parameters())
        out = {"solved_step": solved if solved >= 0 else None, "final_accuracy": greedy, "greedy_accuracy": greedy,
               "token_accuracy": token, "chain_accuracy": chain, "parameters": params,
               "tokens_per_s": round(self.tokens_per_s, 1)}
        peak = peak_flops(self.device)
        if peak:
            out["mfu"] = round(6 * params * self.tokens_per_s / (peak * self.trainer.world_size), 5)
        return out
