"""Circuit task: the compiled evaluation against truths the project did not write (c6288 multiplies, the EPFL adder
adds, c17's published NAND structure, a plain simulation of the netlist), the threshold chain token by token, the
stream rule and held-out split, a user's netlist trained through train.py, and one-line refusals."""
import json
import operator
import random
from functools import reduce

import circuitgraph as cg
import datamodules  # noqa: F401  (registers the tasks)
import lightning_modules  # noqa: F401  (and the model families)
import networkx as nx
import pytest
import torch

from config import ConfigError, compose
from datamodules.circuit import CircuitTask, evaluate, held_out, levels, pattern_of
from datamodules.circuit_config import CircuitConfig, natural, program
from runtime.memory import check_memory
from conftest import at_once, eval_py, one_error_line, train, train_all

CPU = torch.device("cpu")
RUN = ("trainer=cpu", "trainer.progress_bar=false")


def outputs_of(netlist: str, bits: torch.Tensor) -> torch.Tensor:
    """The project's evaluation of every primary output (count, outputs) for input bits (count, n)."""
    plan = program(CircuitConfig(netlist=netlist))
    return evaluate(levels(plan, CPU), bits, len(plan.units))[:, -len(plan.outputs):]


def bits_of(values: list[int], width: int) -> list[list[int]]:
    return [[(v >> i) & 1 for i in range(width)] for v in values]


def test_c6288_is_a_16_by_16_multiplier():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, 2**16, (500,), generator=gen).tolist() for _ in range(2))
    out = outputs_of("c6288", torch.tensor([x + y for x, y in zip(bits_of(a, 16), bits_of(b, 16))]))
    order = list(range(30)) + [31, 30]  # outputs in name order: N6287 is product bit 31, N6288 bit 30
    assert out.tolist() == [[(x * y >> i) & 1 for i in order] for x, y in zip(a, b)]


def test_epfl_adder_adds_128_bit_numbers():
    plan = program(CircuitConfig(netlist="adder"))
    assert plan.inputs[:2] == ("a[0]", "a[1]") and plan.inputs[128] == "b[0]"
    assert plan.outputs[0] == "cOut" and plan.outputs[1:3] == ("f[0]", "f[1]")
    gen = random.Random(2)
    a, b = ([gen.getrandbits(128) for _ in range(200)] for _ in range(2))
    a[0], b[0] = 2**128 - 1, 1  # the carry runs through every bit
    out = outputs_of("adder", torch.tensor([x + y for x, y in zip(bits_of(a, 128), bits_of(b, 128))]))
    assert out.tolist() == [[(x + y) >> 128] + bits_of([x + y], 128)[0] for x, y in zip(a, b)]


def test_c17_matches_its_published_nand_structure():
    def nand(*xs: int) -> int:
        return 1 - reduce(operator.and_, xs)
    patterns = bits_of(list(range(32)), 5)  # inputs N1 N2 N3 N6 N7
    expected = []
    for n1, n2, n3, n6, n7 in patterns:
        n10, n11 = nand(n1, n3), nand(n3, n6)
        n16, n19 = nand(n2, n11), nand(n11, n7)
        expected.append([nand(n10, n16), nand(n16, n19)])  # N22, N23
    assert outputs_of("c17", torch.tensor(patterns)).tolist() == expected


def simulate(netlist: str, rows: list[list[int]]) -> list[list[int]]:
    """Every primary output (name order) of a bundled netlist for each row of input bits, by walking
    circuitgraph's graph in Python."""
    circuit = cg.from_lib(netlist)
    name = {node: node.lstrip("\\") for node in circuit.nodes()}
    inputs = sorted(circuit.inputs(), key=lambda n: natural(name[n]))
    ops = {"and": all, "nand": lambda v: not all(v), "or": any, "nor": lambda v: not any(v),
           "xor": lambda v: sum(v) % 2 == 1, "xnor": lambda v: sum(v) % 2 == 0, "buf": lambda v: v[0],
           "not": lambda v: not v[0]}
    order = list(nx.topological_sort(circuit.graph))
    outputs = sorted(circuit.outputs(), key=lambda n: natural(name[n]))
    out = []
    for bits in rows:
        value = dict(zip(inputs, bits))
        for node in order:
            if node not in value:
                value[node] = int(ops[circuit.type(node)]([value[f] for f in circuit.fanin(node)]))
        out.append([value[o] for o in outputs])
    return out


@pytest.mark.parametrize("netlist", ["c432", "c499"])
def test_every_gates_token_is_the_threshold_of_the_tokens_it_names(netlist):
    task = CircuitTask(compose(["experiment=circuit_gates", f"data.netlist={netlist}"]))
    seq = task.sample(0, 64, 0, CPU)
    n, units = len(task.plan.inputs), task.plan.units
    position = [*range(n), *range(n + 1, n + 1 + len(units))]  # value index -> sequence position
    for j, unit in enumerate(units):
        operands = [position[i] for i in unit.operands]
        assert all(p < n + 1 + j for p in operands), unit
        total = sum(w * seq[:, p] for w, p in zip(unit.weights, operands))
        assert torch.equal(seq[:, n + 1 + j], (total >= unit.threshold).long()), unit
    answer = seq[:, -len(task.plan.outputs):]
    assert answer.tolist() == simulate(netlist, seq[:, :n].tolist())
    assert any(u.name.endswith(".or1") for u in units)  # both have XORs: AND, OR, [OR - AND >= 1]


def test_docstring_example():
    task = CircuitTask(compose(["experiment=circuit_gates"]))
    assert task.values(torch.tensor([[1, 0, 1, 1, 0]])).tolist() == [[0, 0, 1, 1, 1, 0, 1, 0]]
    assert [u.name for u in task.plan.units[:6]] == ["N10", "N11", "N16", "N19", "N22", "N23"]


def test_outputs_choose_the_cone_and_layout():
    full = compose(["experiment=circuit_gates"])
    one = compose(["experiment=circuit_gates", "data.outputs=[N22]"])
    assert [u.name for u in program(one.data).units] == ["N10", "N11", "N16", "N22", "N22.out"]
    task = CircuitTask(one)
    assert (task.prompt_len, task.seq_len, task.answer_len) == (6, 11, 1)
    nocot = CircuitTask(compose(["experiment=circuit_nocot"]))
    assert nocot.seq_len == 8 and torch.equal(nocot.sample(5, 32, 0, CPU)[:, -2:],
                                              CircuitTask(full).sample(5, 32, 0, CPU)[:, -2:])


def test_stream_rule_and_held_out_split():
    task = CircuitTask(compose(["experiment=circuit_nocot"]))
    batch = task.sample(40, 16, 0, CPU)
    assert all(torch.equal(batch[i], task.sample(40 + i, 1, 0, CPU)[0]) for i in range(16))
    train_bits, eval_bits = task.sample(0, 512, 0, CPU)[:, :5], task.sample(0, 512, 1, CPU)[:, :5]
    assert not held_out(0, pattern_of(train_bits)).any() and held_out(0, pattern_of(eval_bits)).all()
    assert 0.24 < held_out(0, torch.arange(2**20)).float().mean() < 0.26  # a quarter of the patterns
    big = CircuitTask(compose(["experiment=circuit_nocot", "data.netlist=c432"]))  # 36 inputs: not split
    assert not torch.equal(big.sample(0, 8, 0, CPU), big.sample(0, 8, 1, CPU))
    assert 0.4 < big.sample(0, 256, 0, CPU)[:, :36].float().mean() < 0.6


def user_circuit() -> cg.Circuit:
    """A circuit nobody bundled: a 4-bit ripple-carry adder (8 inputs, 5 outputs) of XORs, ANDs and ORs."""
    c = cg.Circuit(name="add4")
    for i in range(4):
        c.add(f"a{i}", "input")
        c.add(f"b{i}", "input")
    c.add("s0", "xor", fanin=["a0", "b0"], output=True)
    c.add("c1", "and", fanin=["a0", "b0"])
    for i in range(1, 4):
        c.add(f"s{i}", "xor", fanin=[f"a{i}", f"b{i}", f"c{i}"], output=True)
        for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
            c.add(f"{x}{y}{i}", "and", fanin=[f"{x}{i}", f"{y}{i}"])
        c.add(f"c{i + 1}", "or", fanin=[f"ab{i}", f"ac{i}", f"bc{i}"], output=i == 3)
    return c


def test_a_users_netlist_trains_to_solved(tmp_path):
    for fmt in ("verilog", "bench"):
        cg.to_file(user_circuit(), tmp_path / f"fa.{'v' if fmt == 'verilog' else fmt}", fmt=fmt)
    runs = {fmt: ["experiment=circuit_gates", f"data.netlist={tmp_path / f'fa.{fmt}'}", f"run_dir={tmp_path / fmt}",
                  "eval.size=64", "trainer.max_steps=600", "eval.every_n_steps=50", *RUN] for fmt in ("v", "bench")}
    done = train_all(tmp_path, runs)
    for fmt in runs:
        assert done[fmt].returncode == 0, done[fmt].stderr[-2000:]
        summary = json.loads((tmp_path / fmt / "summary.json").read_text())
        assert summary["final_accuracy"] == 1.0 and summary["solved_step"] is not None, summary
        assert (summary["inputs"], summary["outputs_used"], summary["cone_gates"]) == (8, 5, 17)


def test_a_netlist_edited_since_the_checkpoint_is_another_problem(tmp_path):
    """Rewritten with the same gates (a new mtime, another gate order) the run resumes; with one gate changed
    train.py and eval.py refuse it in one line."""
    netlist, run_dir = tmp_path / "fa.bench", tmp_path / "run"
    cg.to_file(user_circuit(), netlist, fmt="bench")
    args = ["experiment=circuit_gates", f"data.netlist={netlist}", f"run_dir={run_dir}", "eval.size=64",
            "eval.every_n_steps=10", "checkpoint.every_n_steps=10", "optim.schedule=constant",
            "optim.warmup_steps=0", *RUN]  # a constant rate: the budget may grow on resume
    assert train(tmp_path, *args, "trainer.max_steps=10").returncode == 0
    lines = netlist.read_text().splitlines()
    gates = [i for i, line in enumerate(lines) if "=" in line]
    netlist.write_text("\n".join([*lines[:gates[0]], *reversed([lines[i] for i in gates])]) + "\n")
    resumed = train(tmp_path, *args, "trainer.max_steps=20", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    edited = [line.replace("= AND(", "= OR(", 1) if line.startswith("c1 ") else line for line in lines]
    assert edited != lines
    netlist.write_text("\n".join(edited) + "\n")
    refused = one_error_line(train(tmp_path, *args, "trainer.max_steps=30", "resume=auto"), "resume: ")
    assert "was trained on another problem (checkpoint vs config: circuit 'sha256:" in refused
    assert "does not match" in one_error_line(eval_py(run_dir), "run_dir: ") and not (run_dir / "eval.json").exists()


def test_a_run_that_does_not_fit_names_a_numeric_key():
    cfg = compose(["experiment=circuit_gates", "data.netlist=c6288", "model.kind=mlp", "model.width=4096", *RUN])
    with pytest.raises(ConfigError, match="^model.width: the run needs about .*CausalLinear blocks"):
        check_memory(cfg)  # about 800 GB of blocks: no machine has it free


BAD = {
    "sequential.bench": ("INPUT(a)\nOUTPUT(q)\ns = DFF(n)\nn = NAND(a, s)\nq = AND(n, a)\n", "line 3 is a flip-flop"),
    "sequential.v": ("module sequential(clk, a, q);\n  input clk, a;\n  output q;\n  wire n;\n  nand g0 (n, a, q);\n"
                     "  ff f0 (.CK(clk), .D(n), .Q(q));\nendmodule\n", "holds flip-flops"),
    "cycle.bench": ("INPUT(a)\nOUTPUT(q)\nn = NAND(a, q)\nq = AND(n, a)\n", "a combinational cycle through"),
    "unknown.bench": ("INPUT(a)\nINPUT(b)\nOUTPUT(q)\nn = MUX(a, b)\nq = AND(n, b)\n",
                      "line 4: unknown gate type 'MUX'"),
    "unknown.v": ("module unknown(a, b, q);\n  input a, b;\n  output q;\n  wire n;\n  mux2 g0 (n, a, b);\n"
                  "  and g1 (q, n, b);\nendmodule\n", "unknown gate type 'mux2'"),
    "garbage.v": ("\x00\x01 not verilog", "not a gate-level netlist"),
}


def test_bad_netlists_are_refused_in_one_line(tmp_path):
    for name, (text, _) in BAD.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "unreadable.v").write_bytes(b"\xff\xfe\x00module")
    cases = {name: (f"data.netlist={tmp_path / name}", f"data.netlist: {tmp_path / name}: {why}")
             for name, (_, why) in BAD.items()}
    cases["unreadable"] = (f"data.netlist={tmp_path / 'unreadable.v'}", f"data.netlist: {tmp_path / 'unreadable.v'}: "
                                                                        "unreadable (UnicodeDecodeError")
    cases["missing"] = (f"data.netlist={tmp_path / 'missing.v'}", f"data.netlist: '{tmp_path / 'missing.v'}' is not "
                                                                  "a readable .v or .bench file")
    cases["output"] = ("data.outputs=[N22,N99]", "data.outputs: N99 not among the primary outputs of c17")
    cases["chain"] = ("data.chain=tree", "data.chain: 'tree' is not one of none, gates")
    cases["brackets"] = ("data.outputs=[E[0]]", "data.outputs: '[E[0]]' is not a plain YAML value")  # quoted: ['E[0]']
    done = at_once({name: lambda arg=arg: train(tmp_path, "experiment=circuit_gates", arg, f"run_dir={tmp_path / 'r'}",
                                                *RUN) for name, (arg, _) in cases.items()})
    for name, (_, line) in cases.items():
        assert one_error_line(done[name], line), name
    assert not (tmp_path / "r").exists()


def test_refusals_without_a_process():
    with pytest.raises(ConfigError, match="data.netlist: 'c9999' is not a readable"):
        compose(["experiment=circuit_gates", "data.netlist=c9999"])
    with pytest.raises(ConfigError, match="data.netlist: does not apply"):
        compose(["experiment=parity_mlp", "data.netlist=c17"])
    with pytest.raises(ConfigError, match="data.train_size: 64 exceeds the 32 distinct inputs of the circuit task"):
        compose(["experiment=circuit_gates", "data.netlist=c17", "data.train_size=64"])
