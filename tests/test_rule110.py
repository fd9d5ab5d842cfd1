"""Rule 110 task: the automaton against its rule table, the three formats, the held-out cone split, the stream
rule, refusals, and a tiny training that must learn the trace."""
import random

import pytest
import torch

from config import ConfigError, compose
from datamodules.rule110 import Rule110Task, held_out, render, rings, sequences, step_cone, step_ring
from datamodules.rule110_config import CHAINS
from datamodules.stream import Ticket
from lightning_modules.next_token import completion_loss, make_backbone, teacher_forced_and_greedy

CPU = torch.device("cpu")
TABLE = {(1, 1, 1): 0, (1, 1, 0): 1, (1, 0, 1): 1, (1, 0, 0): 0,  # 110 = 0b01101110, read from 111 down to 000
         (0, 1, 1): 1, (0, 1, 0): 1, (0, 0, 1): 1, (0, 0, 0): 0}


def rule110_config(*overrides: str):
    return compose(["experiment=rule110_cot", "data.batch_size=16", "eval.size=64", *overrides])


def diagram(cells: list[int], steps: int) -> list[list[int]]:
    """Brute force: rows 0 .. steps of the ring, by Python loops over the rule table."""
    rows = [cells]
    for _ in range(steps):
        row, w = rows[-1], len(cells)
        rows.append([TABLE[row[i - 1], row[i], row[(i + 1) % w]] for i in range(w)])
    return rows


def expected(cells: list[int], steps: int, chain: str) -> list[int]:
    """Brute force: the token sequence of a first row in the format of the module docstring."""
    rows, m = diagram(cells, steps), len(cells) // 2
    completion = {"none": [rows[steps][m]],
                  "trace": [c for t in range(1, steps + 1) for c in rows[t][m - (steps - t):m + steps - t + 1]],
                  "rows": [c for row in rows[1:] for c in row] + [3, rows[steps][m]]}[chain]
    return cells + [2] + completion


def test_one_step_matches_the_rule_table():
    gen = random.Random(0)
    for w in (3, 4, 9, 33):
        cells = [[gen.randint(0, 1) for _ in range(w)] for _ in range(20)]
        assert step_ring(torch.tensor(cells)).tolist() == [diagram(c, 1)[1] for c in cells]
    strips = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    assert step_cone(strips)[:, 0].tolist() == [TABLE[tuple(s)] for s in strips.tolist()]
    assert [(110 >> i) & 1 for i in range(8)] == [TABLE[i >> 2, (i >> 1) & 1, i & 1] for i in range(8)]


def test_docstring_example():
    cells = torch.tensor([[0, 1, 1, 0, 1]])
    assert [render(sequences(cells, 2, chain)[0]) for chain in CHAINS] == ["01101=0", "01101=1110",
                                                                           "01101=1111100000>0"]


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("cells,steps", [(3, 1), (9, 4), (10, 4), (17, 8), (40, 6)])
def test_formats_match_the_brute_force_diagram(chain, cells, steps):
    dm = Rule110Task(rule110_config(f"data.cells={cells}", f"data.generations={steps}", f"data.chain={chain}",
                                    "seed=3"))
    for stream in (0, 1):
        tokens = dm.sample(0, 60, stream, CPU)
        assert tokens.dtype == torch.int64 and tokens.shape == (60, dm.seq_len)
        for row in tokens.tolist():
            first = row[:cells]
            assert row == expected(first, steps, chain)
            assert row[-1] == diagram(first, steps)[steps][cells // 2]  # the answer: the whole ring's middle cell
            assert row[dm.prompt_len - 1] == 2 and dm.answer_len == 1
    if chain == "trace":
        assert dm.seq_len - dm.prompt_len == steps ** 2


def test_split_is_a_quarter_and_streams_stay_on_their_side():
    patterns = torch.tensor([[(p >> i) & 1 for i in range(13)] for p in range(2 ** 13)])  # every T = 6 cone
    fraction = held_out(0, patterns).float().mean().item()
    assert 0.235 < fraction < 0.265
    assert not torch.equal(held_out(0, patterns), held_out(1, patterns))
    dm = Rule110Task(rule110_config("data.cells=15", "data.generations=6", "eval.size=4000"))
    train = dm.generate(Ticket(0, 250, 0, 1), CPU).tokens[0].reshape(-1, dm.seq_len)[:, 1:14]
    held = dm.eval_set(CPU)[0, :, 1:14]  # the cone of cell 7: cells 1 .. 13
    assert not held_out(0, train).any() and held_out(0, held).all()
    train_cones, held_cones = set(map(tuple, train.tolist())), set(map(tuple, held.tolist()))
    assert train_cones.isdisjoint(held_cones)
    assert len(held_cones) > 1300 and len(train_cones) > 2500  # of about 2048 and 6144: both sides are covered


def test_stream_is_a_pure_function_of_the_index():
    for held in (False, True):
        first = rings(7, 1000, 64, 0, 300, 5, held, CPU)  # 300 cells: three Philox calls per candidate
        for i in (0, 17, 63):
            assert torch.equal(rings(7, 1000 + i, 1, 0, 300, 5, held, CPU)[0], first[i])
        assert torch.equal(rings(7, 1000, 64, 0, 300, 5, held, CPU), first)
        assert not torch.equal(rings(8, 1000, 64, 0, 300, 5, held, CPU), first)
        assert not torch.equal(rings(7, 1000, 64, 1, 300, 5, held, CPU), first)
        assert 0.45 < first.float().mean().item() < 0.55
    big = 2 ** 40 + 5  # sample indices beyond 32 bits
    assert torch.equal(rings(7, big + 3, 1, 0, 17, 8, False, CPU)[0], rings(7, big, 4, 0, 17, 8, False, CPU)[3])


def test_ranks_slice_the_global_batch():
    dm = Rule110Task(rule110_config("data.batch_size=12"))
    whole = dm.generate(Ticket(4, 3, 0, 1), CPU).tokens[0]
    for world in (2, 3):
        parts = [dm.generate(Ticket(4 + j, 1, r, world), CPU).tokens[0, 0] for j in range(3) for r in range(world)]
        assert torch.equal(torch.cat(parts).view(3, 12, dm.seq_len), whole)


@pytest.mark.parametrize("chain,seq_len", [("none", 19), ("trace", 82), ("rows", 156)])
def test_layouts(chain, seq_len):
    layout = Rule110Task.layout(rule110_config(f"data.chain={chain}").data)
    assert (layout.vocab_size, layout.prompt_len, layout.seq_len, layout.answer_len) == (4, 18, seq_len, 1)


def test_summary_fields_leave_steps_to_training():
    """summary.json's ``steps`` counts SGD steps: the task's own fields must not overwrite it, nor it them."""
    fields = Rule110Task(rule110_config()).summary_fields()
    assert "steps" not in fields and (fields["cells"], fields["generations"], fields["chain"]) == (17, 8, "trace")


REFUSALS = [("data.generations=0", "data.generations"), ("data.generations=32", "data.generations"),
            ("data.cells=16", "data.cells"), ("data.cells=4097", "data.cells"), ("data.chain=tree", "data.chain"),
            ("data.digits=2", "data.digits"), ("data.n=20", "data.n"), ("data.steps=8", "data.steps")]


@pytest.mark.parametrize("override,key", REFUSALS)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        Rule110Task(rule110_config(override))


def trained_mlp(chain: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A tiny MLP next-token model trained 400 steps on (w = 7, T = 3): held-out sequences, greedy completions."""
    cfg = rule110_config("model.kind=mlp", "model.width=64", "model.depth=1", "data.cells=7", "data.generations=3",
                         f"data.chain={chain}", "data.batch_size=64", "eval.size=512")
    dm = Rule110Task(cfg)
    net = make_backbone(cfg, dm.vocab_size, dm.seq_len)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    held = dm.eval_set(CPU)[0]
    for tokens in dm.generate(Ticket(0, 400, 0, 1), CPU).tokens[0]:
        loss = completion_loss(net(tokens), tokens, dm.prompt_len)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return held, teacher_forced_and_greedy(net, held, dm.prompt_len)[1], dm.prompt_len


@pytest.fixture
def one_thread():
    """One intra-op thread: these small matmuls run about 40x slower on two threads of a busy 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mlp_learns_the_trace_on_held_out_cones_and_not_the_bare_answer(one_thread):
    """With the trace every held-out chain is exact; the same budget without it misses many answers."""
    held, generated, prompt_len = trained_mlp("trace")
    assert torch.equal(generated, held[:, prompt_len:])
    held, generated, _ = trained_mlp("none")
    assert (generated[:, -1] == held[:, -1]).float().mean() < 0.9
