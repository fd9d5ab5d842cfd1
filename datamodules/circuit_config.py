"""The gate-level circuit task's declarations: its data section, the netlist reader and the threshold program a
circuit compiles to (datamodules/circuit.py evaluates it; its docstring describes the sequences).

A netlist is read with circuitgraph (gate-level Verilog or .bench), which imports neither torch nor numpy, so a
bad file is refused while the command line is checked, in one line naming the file.
"""
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple, Optional

from config import Config, ConfigError, DataConfig, need
from datamodules.problem import Problem, SequenceLayout, register_task

SEPARATOR = 2  # tokens 0 and 1 are bit values
VOCAB_SIZE = 3
CHAINS = ("none", "gates")
SPLIT_BITS = 20  # up to 2^20 input patterns: a quarter of them is held out (datamodules/circuit.py)
BUNDLED = ("c17", "c432", "c499", "c880", "c1355", "c1908", "c2670", "c3540", "c5315", "c6288", "c7552",  # ISCAS-85
           "adder", "arbiter", "bar", "cavlc", "ctrl", "dec", "div", "i2c", "int2float", "log2", "max", "memctrl",
           "multiplier", "priority_ckt", "router", "sin", "sqrt", "square", "voter")  # EPFL combinational
BENCH_GATES = {"buf", "buff", "not", "or", "nor", "and", "nand", "xor", "xnor"}  # what circuitgraph's .bench reader
# knows; any other gate type it skips without a word, so the file is scanned for them first
FLOPS = ("dff",)
GATES = ("buf", "not", "and", "nand", "or", "nor", "xor", "xnor", "0", "1")


@dataclass
class CircuitConfig(DataConfig):
    format: ClassVar[str] = "sequence"
    task: str = "circuit"
    netlist: str = "c17"  # a bundled benchmark by name, or the path of a gate-level .v or .bench file
    outputs: Optional[list[str]] = None  # the primary outputs that form the answer (default: all, in name order)
    chain: str = "none"  # none | gates: every gate of the outputs' cone, one threshold token each


class Unit(NamedTuple):
    """One token of the program: [sum of weight * value of the units it names >= threshold]."""
    name: str  # the gate (or a gate's XOR part) it computes
    operands: tuple[int, ...]  # value indices: inputs 0..n-1, then the units in order
    weights: tuple[int, ...]
    threshold: int


@dataclass(frozen=True)
class Program:
    """A circuit's cone as linear threshold units in topological order; the last ``len(outputs)`` copy the outputs."""
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    units: tuple[Unit, ...]
    gates: int  # gates of the cone (buffers and inverters included)
    depth: int  # the longest input-to-output path, in gates

    def digest(self) -> str:
        """The computation itself, not its file: equal for the same circuit however written, else different."""
        return "sha256:" + hashlib.sha256(repr((self.inputs, self.outputs, self.units)).encode()).hexdigest()[:16]


def natural(name: str) -> list:
    """Sort key: names in numeric order (N2 before N10, a[2] before a[10])."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def bundled_path(name: str) -> Path:
    import circuitgraph
    return Path(circuitgraph.__file__).parent / "netlists" / f"{name}.v"


def locate(netlist: str) -> Path:
    """The file ``data.netlist`` names: a bundled benchmark or a path."""
    if netlist in BUNDLED:
        return bundled_path(netlist)
    path = Path(netlist)
    if path.suffix not in (".v", ".bench") or not path.is_file():
        raise ConfigError(f"data.netlist: {netlist!r} is not a readable .v or .bench file, and is not one of "
                          f"{', '.join(BUNDLED)}")
    return path


def scan_bench(path: Path, text: str) -> None:
    """Refuse gate types circuitgraph's .bench reader would skip, and flip-flops."""
    for number, line in enumerate(text.splitlines(), 1):
        found = re.match(r"\s*[^#\s=]+\s*=\s*([A-Za-z_]\w*)\s*\(", line)
        if not found:
            continue
        kind = found.group(1).lower()
        if kind in FLOPS:
            raise ConfigError(f"data.netlist: {path}: line {number} is a flip-flop ({found.group(1)}): a sequential "
                              f"circuit; only combinational circuits are supported")
        if kind not in BENCH_GATES:
            raise ConfigError(f"data.netlist: {path}: line {number}: unknown gate type {found.group(1)!r}")


def read(path: Path, name: Optional[str]):
    """The circuitgraph Circuit of a netlist file, or ConfigError naming the file and the problem."""
    import circuitgraph as cg
    from circuitgraph.io import dc_flops, genus_flops
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.netlist: {path}: unreadable ({type(err).__name__}: {err})") from None
    if path.suffix == ".bench":
        scan_bench(path, text)
    flops = [cg.BlackBox("ff", ["CK", "D"], ["Q"]), *genus_flops, *dc_flops]
    try:
        return cg.from_file(path, name, blackboxes=flops)
    except Exception as err:  # lark and circuitgraph raise many kinds; each means the file is no netlist we read
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        unknown = re.match(r"Blackbox (\S+) not in list", why)
        if unknown:
            raise ConfigError(f"data.netlist: {path}: unknown gate type {unknown.group(1)!r}") from None
        raise ConfigError(f"data.netlist: {path}: not a gate-level netlist ({why})") from None


def structure(path: Path, circuit) -> tuple[list[str], dict[str, tuple[str, list[str]]], list[str]]:
    """(inputs, gate -> (type, fanin), outputs) of a parsed circuit, names without Verilog's escape; refuses
    sequential, cyclic and undriven circuits."""
    types = {node: circuit.type(node) for node in circuit.nodes()}
    if circuit.blackboxes or any(t in ("bb_input", "bb_output") for t in types.values()):
        boxes = ", ".join(circuit.blackboxes)
        raise ConfigError(f"data.netlist: {path}: holds flip-flops or other black boxes ({boxes}): a sequential "
                          f"circuit; only combinational circuits are supported")
    for node, kind in types.items():
        need(kind in GATES or kind == "input", "data.netlist", f"{path}: net {node} has gate type {kind!r}, which has "
             "no 0/1 value")
        need(kind == "input" or kind in ("0", "1") or circuit.fanin(node), "data.netlist",
             f"{path}: net {node} is never driven")
    if circuit.is_cyclic():
        import networkx as nx
        loop = [edge[0] for edge in nx.find_cycle(circuit.graph)]
        raise ConfigError(f"data.netlist: {path}: a combinational cycle through {' -> '.join(loop[:6])}"
                          f"{' ...' if len(loop) > 6 else ''}")
    plain = {node: node.lstrip("\\") for node in types}
    need(len(set(plain.values())) == len(plain), "data.netlist", f"{path}: two nets differ only by a leading \\")
    gates = {plain[node]: (kind, sorted((plain[f] for f in circuit.fanin(node)), key=natural))
             for node, kind in types.items() if kind != "input"}
    inputs = sorted((plain[node] for node, kind in types.items() if kind == "input"), key=natural)
    outputs = sorted((plain[node] for node in circuit.outputs()), key=natural)
    need(bool(outputs), "data.netlist", f"{path}: no primary outputs")
    return inputs, gates, outputs


def threshold_units(name: str, kind: str, operands: list[int], add) -> int:
    """Append the units of one gate through ``add(unit) -> value index``; the gate's value index."""
    n = len(operands)
    if kind in ("xor", "xnor"):  # pairwise: AND, OR, then [OR - AND >= 1] (XNOR last: [AND - OR >= 0])
        value = operands[0]
        for i, other in enumerate(operands[1:], 1):
            both = add(Unit(f"{name}.and{i}", (value, other), (1, 1), 2))
            either = add(Unit(f"{name}.or{i}", (value, other), (1, 1), 1))
            last_xnor = kind == "xnor" and i == n - 1
            value = add(Unit(name if i == n - 1 else f"{name}.xor{i}", (either, both),
                             (-1, 1) if last_xnor else (1, -1), 0 if last_xnor else 1))
        return value if n > 1 else add(Unit(name, (value,), (1 if kind == "xor" else -1,), 1 if kind == "xor" else 0))
    weight, threshold = {"and": (1, n), "or": (1, 1), "buf": (1, 1), "nand": (-1, 1 - n), "nor": (-1, 0),
                         "not": (-1, 0), "0": (1, 1), "1": (1, 0)}[kind]
    return add(Unit(name, tuple(operands), (weight,) * n, threshold))


def compile_program(inputs: list[str], gates: dict[str, tuple[str, list[str]]], outputs: list[str]) -> Program:
    """The threshold program of the outputs' fan-in cone, gates in (level, name) order."""
    cone, stack = set(), [o for o in outputs if o in gates]
    while stack:
        node = stack.pop()
        if node not in cone:
            cone.add(node)
            stack += [f for f in gates[node][1] if f in gates]
    level = {name: 0 for name in inputs}
    for node in sorted(cone, key=natural):  # longest path from the inputs, iteratively
        pending = [node]
        while pending:
            top = pending[-1]
            missing = [f for f in gates[top][1] if f not in level]
            if missing:
                pending += missing
            else:
                level[top] = 1 + max((level[f] for f in gates[top][1]), default=0)
                pending.pop()
    units: list[Unit] = []
    index = {name: i for i, name in enumerate(inputs)}

    def add(unit: Unit) -> int:
        units.append(unit)
        return len(inputs) + len(units) - 1

    for node in sorted(cone, key=lambda g: (level[g], natural(g))):
        kind, fanin = gates[node]
        index[node] = threshold_units(node, kind, [index[f] for f in fanin], add)
    for out in outputs:
        add(Unit(f"{out}.out", (index[out],), (1,), 1))
    return Program(tuple(inputs), tuple(outputs), tuple(units), len(cone), max(level[o] for o in outputs))


@functools.lru_cache(maxsize=8)
def parsed(path: str, name: Optional[str], stamp: tuple[int, int]):
    """A netlist's structure, read once per process (``stamp``: the file's mtime and size, so an edit is seen)."""
    return structure(Path(path), read(Path(path), name))


def program(data: CircuitConfig) -> Program:
    """The threshold program of ``data.netlist``'s ``data.outputs`` (ConfigError for a bad file or name)."""
    path = locate(data.netlist)
    stat = path.stat()
    inputs, gates, outputs = parsed(str(path), data.netlist if data.netlist in BUNDLED else None,
                                    (stat.st_mtime_ns, stat.st_size))
    chosen = outputs if data.outputs is None else [o.lstrip("\\") for o in data.outputs]
    unknown = [o for o in chosen if o not in outputs]
    need(not unknown, "data.outputs", f"{', '.join(unknown)} not among the primary outputs of {data.netlist} "
         f"({', '.join(outputs[:8])}{', ...' if len(outputs) > 8 else ''})")
    need(bool(chosen) and len(set(chosen)) == len(chosen), "data.outputs", f"must name distinct outputs, got {chosen}")
    return compile_program(inputs, gates, chosen)


@register_task("circuit")
class CircuitProblem(Problem):
    datamodule = "datamodules.circuit:CircuitTask"
    size_key = "data.netlist"
    configs = {"sequence": CircuitConfig}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(d.chain in CHAINS, "data.chain", f"{d.chain!r} is not one of {', '.join(CHAINS)}")
        program(d)

    @classmethod
    def input_space(cls, data: CircuitConfig) -> Optional[int]:
        return 2 ** len(program(data).inputs)

    @classmethod
    def layout(cls, data: CircuitConfig) -> SequenceLayout:
        plan = program(data)
        prompt, answer = len(plan.inputs) + 1, len(plan.outputs)
        return SequenceLayout(VOCAB_SIZE, prompt, prompt + (len(plan.units) if data.chain == "gates" else answer),
                              answer)
