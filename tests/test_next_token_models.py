"""Linear and MLP next-token models and the multiplication task: causality, cache, format, split, stream."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, compose, task_class
from runtime.memory import footprint
from datamodules.parity import ParityTask
from datamodules.multiply import MultiplyTask, held_out, operands, render, sequences
from datamodules.stream import Ticket, train_stream
from networks import autoregressive
from networks.autoregressive import AutoregressiveNet, CausalLinear
from lightning_modules.next_token import NextTokenModule, completion_loss, make_backbone, teacher_forced_and_greedy
from runtime.experiment import build

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def multiply_config(*overrides: str):
    width = [] if "model.kind=linear" in overrides else ["model.width=16"]  # the linear model has no width
    return compose(["experiment=multiply_cot", "data.batch_size=16", *width, "eval.size=64", *overrides])


def backbone(kind: str, vocab: int = 15, seq_len: int = 25, depth: int = 2) -> AutoregressiveNet:
    torch.manual_seed(0)
    sizes = [f"model.depth={depth}"] if kind != "linear" else []  # the linear model has no depth
    net = make_backbone(multiply_config(f"model.kind={kind}", *sizes), vocab, seq_len)
    with torch.no_grad():  # the linear model starts at zero: give every parameter a value
        for p in net.parameters():
            p.normal_()
    return net


def parse(text: str, digits: int) -> dict:
    """Brute force: the numbers a sequence's text states, in plain Python integers."""
    prompt, completion = text.split("=")
    a, b = prompt.split("*")
    out = {"a": int(a), "b": int(b), "answer": completion[-2 * digits:]}
    if ">" in completion:
        chain, _ = completion.split(">")
        partials, *sums = chain.split(";")
        out["partials"] = [int(p[::-1]) for p in partials.split("+")]  # least significant digit first
        out["sums"] = [int(s[::-1]) for s in sums]
        out["widths"] = {len(p) for p in partials.split("+")} | {len(s) for s in sums}
    return out


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_changing_a_future_token_never_changes_earlier_logits(kind):
    net = backbone(kind)
    tokens = torch.randint(0, 15, (8, 25))
    logits = net(tokens)
    for p in (0, 5, 24):
        changed = tokens.clone()
        changed[:, p:] = (changed[:, p:] + torch.randint(1, 15, changed[:, p:].shape)) % 15
        other = net(changed)
        assert torch.equal(other[:, :p], logits[:, :p])
        assert not torch.allclose(other[:, p], logits[:, p])  # position p does see its own token


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cached_generation_equals_recomputing_the_prefix(kind):
    net = backbone(kind, depth=1)
    tokens = torch.randint(0, 15, (32, 25))
    logits, generated = teacher_forced_and_greedy(net, tokens, 6, use_cache=True)
    logits_plain, generated_plain = teacher_forced_and_greedy(net, tokens, 6, use_cache=False)
    torch.testing.assert_close(logits, logits_plain)
    assert torch.equal(generated, generated_plain)
    assert torch.equal(net(tokens[:, :7]), logits[:, :7])  # a shorter prefix: the same model


def dense_reference(layer: CausalLinear, tokens: torch.Tensor) -> torch.Tensor:
    """CausalLinear's definition written out: one-hot prefix times the assembled block-lower-triangular matrix."""
    T, V, O = layer.seq_len, layer.vocab_size, layer.out_features
    target, source = torch.tril_indices(T, T)
    dense = layer.blocks.new_zeros(T, V, T, O)
    dense[source, :, target, :] = layer.blocks
    onehot = F.one_hot(tokens, V).float().flatten(1)  # (B, t * V)
    t = tokens.shape[1]
    return (onehot @ dense[:t, :, :t].reshape(t * V, t * O)).view(-1, t, O) + layer.bias.view(T, O)[:t]


@pytest.mark.parametrize("span_elements", [2**22, 300, 1])  # one span, several, one target each
def test_causal_linear_spans_match_the_dense_definition(monkeypatch, span_elements):
    monkeypatch.setattr(autoregressive, "SPAN_ELEMENTS", span_elements)
    torch.manual_seed(0)
    layer = CausalLinear(19, 3, 4)
    with torch.no_grad():
        layer.bias.normal_()
    tokens = torch.randint(0, 3, (6, 19))
    weights = torch.randn(6, 19, 4)
    for t in (19, 11):
        ours, reference = layer(tokens[:, :t]), dense_reference(layer, tokens[:, :t])
        torch.testing.assert_close(ours, reference)
        grads = [torch.autograd.grad((out * weights[:, :t]).sum(), [layer.blocks, layer.bias])
                 for out in (ours, reference)]
        for mine, theirs in zip(*grads):
            torch.testing.assert_close(mine, theirs)


def test_parameter_count_is_the_lower_triangle():
    T, V, width = 25, 15, 16
    assert sum(p.numel() for p in backbone("linear").parameters()) == T * (T + 1) // 2 * V * V + T * V
    mlp = backbone("mlp", depth=2)
    expected = T * (T + 1) // 2 * V * width + T * width + (width * width + width) + (width * V + V)
    assert sum(p.numel() for p in mlp.parameters()) == expected


def test_docstring_example():
    a, b = torch.tensor([12]), torch.tensor([34])
    assert render(sequences(a, b, 2, "sequential")[0]) == "12*34=8400+0630;8040>0408"
    assert render(sequences(a, b, 2, "none")[0]) == "12*34=0408"


@pytest.mark.parametrize("digits", [1, 2, 3, 4, 9])
def test_chain_matches_python_arithmetic(digits):
    dm = MultiplyTask(multiply_config(f"data.digits={digits}", "seed=5"))
    tokens = dm.sample(0, 200, 0, CPU)
    assert tokens.shape == (200, dm.seq_len) and dm.prompt_len == 2 * digits + 2
    for row in tokens:
        text = render(row)
        s = parse(text, digits)
        a, b = s["a"], s["b"]
        assert 10 ** (digits - 1) <= a < 10 ** digits and 10 ** (digits - 1) <= b < 10 ** digits
        b_digits = [int(c) for c in reversed(str(b))]
        assert s["partials"] == [a * bj * 10 ** j for j, bj in enumerate(b_digits)]
        assert s["sums"] == [a * (b % 10 ** (j + 1)) for j in range(1, digits)]
        assert s["widths"] == {2 * digits}
        assert s["answer"] == str(a * b).zfill(2 * digits)
        assert text.index("=") + 1 == dm.prompt_len


def test_split_is_a_quarter_and_streams_stay_on_their_side():
    pairs = torch.cartesian_prod(torch.arange(10, 100), torch.arange(10, 100))
    fraction = held_out(0, pairs[:, 0], pairs[:, 1]).float().mean().item()
    assert 0.23 < fraction < 0.27
    assert not torch.equal(held_out(0, pairs[:, 0], pairs[:, 1]), held_out(1, pairs[:, 0], pairs[:, 1]))
    dm = MultiplyTask(multiply_config("eval.size=6000"))
    train = dm.generate(Ticket(0, 40, 0, 1), CPU).tokens.reshape(-1, dm.seq_len)
    held = dm.eval_set(CPU)[0]
    train_pairs = {tuple(map(int, render(r).split("=")[0].split("*"))) for r in train}
    held_pairs = {tuple(map(int, render(r).split("=")[0].split("*"))) for r in held}
    assert train_pairs.isdisjoint(held_pairs)
    a, b = torch.tensor(sorted(train_pairs)).T
    assert not held_out(0, a, b).any()
    a, b = torch.tensor(sorted(held_pairs)).T
    assert held_out(0, a, b).all()
    assert len(held_pairs) > 1800  # most of the ~2025 held-out pairs: the eval stream covers the quarter


def test_stream_is_a_pure_function_of_the_index():
    for held in (False, True):
        a, b = operands(7, 1000, 64, 0, 3, held, CPU)
        for i in (0, 17, 63):
            a1, b1 = operands(7, 1000 + i, 1, 0, 3, held, CPU)
            assert (a1.item(), b1.item()) == (a[i].item(), b[i].item())
        again = operands(7, 1000, 64, 0, 3, held, CPU)
        assert torch.equal(again[0], a) and torch.equal(again[1], b)
        assert not torch.equal(operands(8, 1000, 64, 0, 3, held, CPU)[0], a)
    big = 2**40 + 5  # sample indices beyond 32 bits
    a, b = operands(7, big, 4, 0, 3, False, CPU)
    assert (operands(7, big + 3, 1, 0, 3, False, CPU)[0].item()) == a[3].item()


def test_ranks_slice_the_global_batch():
    dm = MultiplyTask(multiply_config("data.batch_size=12"))
    whole = dm.generate(Ticket(4, 3, 0, 1), CPU).tokens[0]
    for world in (2, 3):
        parts = [dm.generate(Ticket(4 + j, 1, r, world), CPU).tokens[0, 0] for j in range(3) for r in range(world)]
        assert torch.equal(torch.cat(parts).view(3, 12, dm.seq_len), whole)


@pytest.mark.parametrize("override,key", [("data.digits=0", "data.digits"), ("data.digits=10", "data.digits"),
                                          ("data.chain=tree", "data.chain"), ("data.noise=0.1", "data.noise")])
def test_bad_multiply_config(override, key):
    with pytest.raises(ConfigError, match=key):
        MultiplyTask(multiply_config(override))


def test_mlp_learns_the_parity_chain():
    """Tiny convergence: the MLP model learns (n=10, k=3) parity with the sequential chain."""
    cfg = compose(["experiment=cot_parity", "model.kind=mlp", "model.width=64", "model.depth=1", "data.n=10",
                   "data.k=3", "data.batch_size=64", "optim.lr=0.01", "optim.weight_decay=0.0", "eval.size=512"])
    torch.manual_seed(0)
    dm = ParityTask(cfg)
    net = make_backbone(cfg, dm.vocab_size, dm.seq_len)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    for tokens in dm.generate(Ticket(0, 300, 0, 1), CPU).tokens[0]:
        loss = completion_loss(net(tokens), tokens, dm.prompt_len)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = dm.eval_set(CPU)[0]
    _, generated = teacher_forced_and_greedy(net, held, dm.prompt_len)
    assert torch.equal(generated[:, -1], held[:, -1])


def test_train_py_multiply_writes_the_summary(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "experiment=multiply_cot", "model.kind=linear",
                          "trainer=cpu", "trainer.max_steps=10", "eval.every_n_steps=10", "eval.size=64",
                          "data.batch_size=16", "trainer.progress_bar=false", f"run_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["secret"] is None and "n" not in summary
    assert (summary["task"], summary["digits"], summary["chain"], summary["kind"]) == ("multiply", 2, "sequential", "linear")
    assert summary["parameters"] == 25 * 26 // 2 * 15 * 15 + 25 * 15
    assert all(0.0 <= summary[key] <= 1.0 for key in ("token_accuracy", "greedy_accuracy", "chain_accuracy"))
    assert summary["chain_accuracy"] <= summary["greedy_accuracy"]  # an exact chain ends in the exact answer


# --- ensembles ------------------------------------------------------------------------------------------------
ENSEMBLE_CASES = {  # family -> a tiny config where weight decay, warmup, the cosine schedule and the clip all act
    "transformer": ["experiment=tree_cot_parity", "data.n=10", "data.k=4", "model.d_model=16", "model.heads=2",
                    "optim.lr=0.01"],
    "linear": ["experiment=cot_parity", "model.kind=linear", "data.n=10", "data.k=3", "optim.lr=0.05"],
    "mlp": ["experiment=multiply_cot", "model.width=16", "optim.name=sgd", "optim.momentum=0.9",
            "optim.weight_decay=0.01"],
}
SHORT = ["data.batch_size=16", "trainer.max_steps=48", "eval.every_n_steps=12", "eval.size=32",
         "checkpoint.every_n_steps=48", "optim.warmup_steps=8", "optim.grad_clip=0.05", "trainer.steps_per_batch=6"]


def fitted(args: list[str]) -> NextTokenModule:
    """A module trained in-process by Lightning for the config's steps, on trainer.cpu_threads threads as train.py
    trains (two threads on a busy two-core machine are many times slower)."""
    cfg = compose([*args, *SHORT])
    torch.manual_seed(cfg.seed)
    dm, module = build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.trainer.cpu_threads)
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    return module


@pytest.mark.parametrize("family", sorted(ENSEMBLE_CASES))
def test_member_in_an_ensemble_equals_member_alone_bitwise(family):
    """Member m of a 2-member ensemble, after 48 steps with a per-member clip that bites, weight decay and a
    warmup/cosine schedule, has exactly the weights and evaluation of the run of member m alone."""
    args = ENSEMBLE_CASES[family]
    group = fitted([*args, "model.ensemble=2"])
    first, second = (list(net.parameters()) for net in group.backbones)
    assert not any(torch.equal(a, b) for a, b in zip(first, second) if a.numel() > 1)  # own inits and data
    together = group.results()
    for i, member in enumerate(group.members):
        alone = fitted([*args, f"model.member_offset={member}"])
        for (name, a), b in zip(group.backbones[i].named_parameters(), alone.backbones[0].parameters()):
            assert torch.equal(a, b), f"member {member}: {name}"
        single = alone.results()
        for key in ("solved_step", "token_accuracy", "greedy_accuracy", "chain_accuracy"):
            assert together[key][i] == single[key], key
    assert 0.0 < group.accuracy[:, 0].min() < 1.0  # trained, not trivially solved


@pytest.mark.parametrize("args", [["experiment=tree_cot_parity", "data.noise=0.1"], ["experiment=multiply_cot"]])
def test_each_member_has_its_own_streams_and_member_zero_keeps_today_s(args):
    group, alone = (task_class(cfg.data.task).implementation()(cfg) for cfg in
                    (compose([*args, "model.ensemble=3", "eval.size=32"]),
                     compose([*args, "model.member_offset=2", "eval.size=32"])))
    ticket = Ticket(5, 2, 0, 1)
    batch, held = group.generate(ticket, CPU).tokens, group.eval_set(CPU)
    assert batch.shape == (3, 2, group.cfg.data.batch_size, group.seq_len) and held.shape == (3, 32, group.seq_len)
    assert torch.equal(batch[2], alone.generate(ticket, CPU).tokens[0]) and torch.equal(held[2], alone.eval_set(CPU)[0])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(held[0], held[1])
    start, count = 5 * group.cfg.data.batch_size, 2 * group.cfg.data.batch_size
    if isinstance(group, ParityTask):  # member 0: the stream a single model trained on before ensembles
        noise = group.cfg.data.noise
        assert torch.equal(batch[0].reshape(count, -1), group.sequences(start, count, train_stream(0), noise, CPU))
    else:  # every member's held-out operands are on the held-out side of the split, its training ones never
        for rows, side in ((batch.reshape(-1, group.seq_len), False), (held.reshape(-1, group.seq_len), True)):
            a, b = (torch.tensor([int(render(r).split("=")[0].split("*")[i]) for r in rows]) for i in (0, 1))
            assert bool(held_out(group.cfg.seed, a, b).all() if side else not held_out(group.cfg.seed, a, b).any())


class StubTrainer:
    """What NextTokenModule.evaluate reads of its trainer."""
    logger, datamodule, should_stop = None, None, False

    def __init__(self):
        self.callback_metrics = {}


def test_ensemble_records_each_member_s_solve_and_stops_when_all_are_solved(monkeypatch):
    cfg = compose(["experiment=tree_cot_parity", "model.ensemble=2", "eval.size=8"])
    module = build(cfg)[1]
    module._trainer = StubTrainer()
    scripted = iter([[[0.9, 1.0, 0.5], [0.8, 0.5, 0.0]], [[1.0, 1.0, 1.0], [0.9, 0.75, 0.5]],
                     [[0.95, 0.5, 0.5], [1.0, 1.0, 1.0]]])  # per member: token, greedy, chain
    monkeypatch.setattr(module, "measure", lambda dm: torch.tensor(next(scripted)))
    for step, stops in ((100, False), (200, False), (300, True)):
        module.evaluate(step)
        assert module.trainer.should_stop == stops
    assert module.trainer.callback_metrics["eval/members_solved"] == 2
    assert module.trainer.callback_metrics["eval/greedy_accuracy_min"] == 0.5
    results = module.results()
    assert results["solved_step"] == [100, 300]  # member 0 stays solved at its first 100%
    assert results["greedy_accuracy"] == [0.5, 1.0] and results["final_accuracy"] == [0.5, 1.0]
    assert results["parameters"] == sum(p.numel() for p in module.backbones[0].parameters())
    single = build(compose(["experiment=tree_cot_parity", "eval.size=8"]))[1]
    assert single.results()["solved_step"] is None and single.metrics(torch.tensor([[0.5, 0.25, 0.0]])) == {
        "final_accuracy": 0.25, "greedy_accuracy": 0.25, "token_accuracy": 0.5, "chain_accuracy": 0.0}


@pytest.mark.parametrize("preset, kind", [("tree_cot_parity", "transformer"), ("cot_parity", "linear"),
                                          ("multiply_cot", "mlp")])
def test_memory_estimate_scales_with_the_ensemble(preset, kind):
    """Every term but the one-member-at-a-time evaluation pass and span of targets grows E-fold."""
    one, four = (footprint(compose([f"experiment={preset}", f"model.kind={kind}", f"model.ensemble={e}"]))
                 for e in (1, 4))
    for a, b in zip(one, four):
        assert b.bytes == (a.bytes if a.what.startswith(("evaluation pass", "one span")) else 4 * a.bytes), a.what
