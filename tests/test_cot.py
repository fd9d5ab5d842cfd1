"""Chain-of-thought parity: sequence formats, loss mask, KV cache, Triton wiring, convergence via train.py."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from config import ConfigError, compose
from datamodules.cot import tree_plan
from datamodules.parity import ParityTask
from datamodules.stream import Ticket
from kernels import sparse_parity
from networks.transformer import CoTTransformer
from lightning_modules.optimizers import lr_factor
from lightning_modules.next_token import NextTokenModule, completion_loss, make_backbone, \
    teacher_forced_and_greedy

ROOT = Path(__file__).resolve().parents[1]
SEP = 2


def cot_config(*overrides: str):
    return compose(["experiment=cot_parity", "data.n=12", "data.k=4", "data.batch_size=8", "model.d_model=32",
                    "model.heads=2", "eval.size=64", *overrides])


def tree_ranges(k: int) -> list[tuple[int, int]]:
    """Brute force: the secret positions [lo, hi) each tree node covers, level by level."""
    level, nodes = [(i, i + 1) for i in range(k)], []
    while len(level) > 1:
        merged = [(level[i][0], level[i + 1][1]) for i in range(0, len(level) - 1, 2)]
        nodes += merged
        level = merged + level[len(merged) * 2:]
    return nodes or level


def expected_chain(bits: list[int], secret: list[int], chain: str) -> list[int]:
    picked = [bits[i] for i in secret]
    xor = lambda lo, hi: sum(picked[lo:hi]) % 2  # noqa: E731
    if chain == "none":
        return [xor(0, len(secret))]
    if chain == "sequential":
        return [xor(0, j + 1) for j in range(len(secret))]
    return [xor(lo, hi) for lo, hi in tree_ranges(len(secret))]


def test_tree_shapes_by_hand():
    assert tree_ranges(8) == [(0, 2), (2, 4), (4, 6), (6, 8), (0, 4), (4, 8), (0, 8)]
    assert tree_ranges(6) == [(0, 2), (2, 4), (4, 6), (0, 4), (0, 6)]  # (4, 6) is carried up a level
    assert tree_ranges(5) == [(0, 2), (2, 4), (0, 4), (0, 5)]
    assert tree_ranges(1) == [(0, 1)]
    for k in range(2, 10):
        assert len(tree_plan(k)) == k - 1


@pytest.mark.parametrize("chain,ks", [("none", [1, 3, 8]), ("sequential", [1, 3, 8]), ("tree", range(1, 10))])
def test_formats_match_brute_force(chain, ks):
    for k in ks:
        dm = ParityTask(cot_config(f"data.chain={chain}", f"data.k={k}", "seed=3"))
        tokens = dm.sequences(5, 50, stream=0, noise=0.0, device=torch.device("cpu"))
        bits, _, _ = sparse_parity(3, 5, 50, 12, dm.secret, stream=0, backend="torch")
        assert tokens.dtype == torch.int64 and tokens.shape == (50, dm.seq_len)
        for row, x in zip(tokens.tolist(), bits.tolist()):
            assert row == x + [SEP] + expected_chain(x, dm.secret, chain), (chain, k)
        assert dm.prompt_len == 13 and dm.seq_len - dm.prompt_len == len(expected_chain([0] * 12, dm.secret, chain))


def test_noise_flips_only_the_answer():
    dm = ParityTask(cot_config("data.chain=sequential", "data.noise=0.3"))
    clean = dm.sequences(0, 2000, 0, 0.0, torch.device("cpu"))
    noisy = dm.sequences(0, 2000, 0, 0.3, torch.device("cpu"))
    assert torch.equal(clean[:, :-1], noisy[:, :-1])
    assert 0.25 < (clean[:, -1] != noisy[:, -1]).float().mean() < 0.35


def test_rank_slices_make_the_global_batch_and_eval_is_held_out():
    dm = ParityTask(cot_config())
    cpu = torch.device("cpu")
    whole = dm.generate(Ticket(7, 3, 0, 1), cpu).tokens[0]  # member 0's row
    parts = [dm.generate(Ticket(7, 3, r, 2), cpu).tokens[0] for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert not torch.equal(dm.eval_set(cpu)[0, :8], dm.generate(Ticket(0, 1, 0, 1), cpu).tokens[0, 0])


def test_loss_covers_exactly_the_completion():
    dm = ParityTask(cot_config("data.chain=tree", "data.k=5"))
    tokens = dm.eval_set(torch.device("cpu"))[0, :4]
    logits = torch.randn(4, dm.seq_len, dm.vocab_size, requires_grad=True)
    completion_loss(logits, tokens, dm.prompt_len).backward()
    touched = (logits.grad.abs().sum((0, 2)) > 0).nonzero().flatten().tolist()
    assert touched == list(range(dm.prompt_len - 1, dm.seq_len - 1))


@pytest.mark.parametrize("positional", ["learned", "rope", "none"])
def test_kv_cache_equals_full_recompute(positional):
    cfg = cot_config(f"model.positional={positional}", "model.depth=2")
    m = cfg.model
    model = CoTTransformer(3, 17, m.depth, m.d_model, m.heads, m.positional).eval()
    for p in model.parameters():  # larger weights than the init, so the logits differ across positions
        p.data.normal_(0, 0.3)
    tokens = torch.randint(0, 3, (5, 17))
    full = model(tokens)
    cache = model.init_cache(5, torch.device("cpu"))
    steps = [model.forward_cached(tokens[:, :13], cache, 0)]
    steps += [model.forward_cached(tokens[:, t:t + 1], cache, t) for t in range(13, 17)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    logits_c, generated_c = teacher_forced_and_greedy(model, tokens, 13, use_cache=True)
    logits_r, generated_r = teacher_forced_and_greedy(model, tokens, 13, use_cache=False)
    torch.testing.assert_close(logits_c, full)
    assert torch.equal(generated_c, generated_r) and generated_c.shape == (5, 4)
    assert not torch.equal(generated_c, tokens[:, 13:])  # really generated, not copied from the teacher


def test_bad_model_shapes_name_the_key():
    with pytest.raises(ConfigError, match="^model.heads:"):
        cot_config("model.heads=3")
    with pytest.raises(ValueError, match="3 heads do not split d_model 32"):
        CoTTransformer(3, 20, d_model=32, heads=3)
    with pytest.raises(ConfigError, match="^model.ensemble:"):
        ParityTask(cot_config("model.ensemble=0"))


def test_warmup_then_cosine_to_ten_percent():
    assert lr_factor(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, "constant") == 1.0


def _one_step(backend: str) -> tuple[NextTokenModule, dict]:
    cfg = cot_config(f"kernels.backend={backend}", "data.k=3", "trainer.max_steps=1", "eval.every_n_steps=1",
                     "optim.warmup_steps=0", "seed=1")
    dm = ParityTask(cfg)
    module = NextTokenModule(cfg, [make_backbone(cfg, dm.vocab_size, dm.seq_len)], dm.prompt_len, dm.seq_len,
                             dm.answer_len)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return module, module.results()


def test_triton_backend_matches_torch(monkeypatch):
    """One training step under the Triton interpreter: data and attention kernels run, weights match torch."""
    import kernels.attention_triton as attention_triton
    import kernels.sparse_parity_triton as sparse_parity_triton
    calls = {"data": 0, "attn_fwd": 0, "attn_bwd": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(sparse_parity_triton, "sparse_parity_triton",
                        counted("data", sparse_parity_triton.sparse_parity_triton))
    monkeypatch.setattr(attention_triton, "flash_attn_forward",
                        counted("attn_fwd", attention_triton.flash_attn_forward))
    monkeypatch.setattr(attention_triton, "flash_attn_backward",
                        counted("attn_bwd", attention_triton.flash_attn_backward))
    reference, ref_results = _one_step("torch")
    assert calls == {"data": 0, "attn_fwd": 0, "attn_bwd": 0}
    triton_run, triton_results = _one_step("triton")
    assert calls["data"] >= 2 and calls["attn_fwd"] >= 2 and calls["attn_bwd"] >= 1, calls  # train + eval
    for (name, a), b in zip(reference.backbones[0].named_parameters(), triton_run.backbones[0].parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    assert triton_results["token_accuracy"] == ref_results["token_accuracy"]


def test_train_py_solves_small_sequential_parity(tmp_path):
    """Convergence: (n=10, k=3) with the sequential chain reaches greedy accuracy 1.0 on held-out prompts."""
    cmd = [sys.executable, "train.py", "experiment=cot_parity", f"run_dir={tmp_path}", "trainer.accelerator=cpu",
           "trainer.progress_bar=false", "data.n=10", "data.k=3", "model.d_model=32", "model.heads=2",
           "trainer.max_steps=600", "eval.every_n_steps=50", "eval.size=1024", "checkpoint.every_n_steps=600"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["greedy_accuracy"] == 1.0 and summary["final_accuracy"] == 1.0
    assert summary["token_accuracy"] == 1.0 and summary["chain_accuracy"] == 1.0
    assert summary["solved_step"] is not None and summary["steps"] == summary["solved_step"] < 600
    assert len(summary["secret"]) == 3 and summary["tokens_per_s"] > 0 and summary["parameters"] > 0
