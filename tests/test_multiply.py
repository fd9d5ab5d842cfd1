"""The malach multiplication chains: exact tokens against a plain-Python construction, layout, split."""
import pytest
import torch

from config import compose
from datamodules.multiply import MultiplyTask, held_out, render, sequences
from datamodules.multiply_config import MultiplyConfig
from datamodules.stream import Ticket

CPU = torch.device("cpu")
MALACH = ("malach", "malach_joined")
WORD_TOKENS = {**{str(i): i for i in range(10)}, "*": 10, "=": 11, "+": 12, "(": 15, ")": 16,
               **{f"{i}x{j}": 17 + 10 * i + j for i in range(10) for j in range(10)}}


def malach_words(a: int, b: int, digits: int, joined: bool) -> list[str]:
    """Brute force: Malach's product text for a * b as words, built from Python strings and integers."""
    a_digits, b_digits = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]

    def plus_joined(groups: list[list[str]]) -> list[str]:
        return [w for k, group in enumerate(groups) for w in (["+"] if k else []) + group]

    def expansion(xs: list[int]) -> list[str]:
        return ["(", *plus_joined([[str(x), "*", *str(10 ** i)] for i, x in enumerate(xs)]), ")"]

    terms, values = [], []
    for i, ai in enumerate(a_digits):
        for j, bj in enumerate(b_digits):
            pair = [f"{ai}x{bj}"] if joined else [str(ai), "*", str(bj)]
            terms.append([*pair, "*", *str(10 ** i), "*", *str(10 ** j)])
            values.append(list(str(ai * bj * 10 ** i * 10 ** j).zfill(len(str(10 ** i * 10 ** j)) + 1)))
    return [*str(a), "*", *str(b), "=", *expansion(a_digits), "*", *expansion(b_digits), "=",
            *plus_joined(terms), "=", *plus_joined(values), "=", *str(a * b).zfill(2 * digits)]


def expected(a: int, b: int, digits: int, chain: str) -> list[int]:
    return [WORD_TOKENS[w] for w in malach_words(a, b, digits, chain == "malach_joined")]


def task(*overrides: str) -> MultiplyTask:
    return MultiplyTask(compose(["experiment=multiply_cot", "model.width=16", "data.batch_size=16", "eval.size=64",
                                 *overrides]))


def test_docstring_example():
    a, b = torch.tensor([12]), torch.tensor([34])
    assert (render(sequences(a, b, 2, "malach")[0])
            == "12*34=(2*1+1*10)*(4*1+3*10)=2*4*1*1+2*3*1*10+1*4*10*1+1*3*10*10=08+060+040+0300=0408")
    assert (render(sequences(a, b, 2, "malach_joined")[0])
            == "12*34=(2*1+1*10)*(4*1+3*10)=2x4*1*1+2x3*1*10+1x4*10*1+1x3*10*10=08+060+040+0300=0408")


@pytest.mark.parametrize("chain", MALACH)
@pytest.mark.parametrize("a, b, digits", [(12, 34, 2), (10, 10, 2), (99, 99, 2), (7, 8, 1), (100, 999, 3),
                                          (305, 120, 3), (9999, 1001, 4), (123456789, 987654321, 9)])
def test_exact_tokens_of_chosen_pairs(chain, a, b, digits):
    assert sequences(torch.tensor([a]), torch.tensor([b]), digits, chain)[0].tolist() == expected(a, b, digits, chain)


@pytest.mark.parametrize("chain", MALACH)
@pytest.mark.parametrize("digits", [1, 2, 3, 4])
def test_sampled_sequences_match_the_brute_force_and_end_in_the_product(chain, digits):
    dm = task(f"data.digits={digits}", f"data.chain={chain}", "seed=3")
    tokens = dm.generate(Ticket(0, 2, 0, 1), CPU).tokens.reshape(-1, dm.seq_len)
    assert tokens.shape == (32, dm.seq_len) and int(tokens.max()) < dm.vocab_size
    for row in tokens.tolist():
        a = int("".join(map(str, row[:digits])))
        b = int("".join(map(str, row[digits + 1:2 * digits + 1])))
        assert row == expected(a, b, digits, chain)
        assert int("".join(map(str, row[-dm.answer_len:]))) == a * b


@pytest.mark.parametrize("chain, digits, seq_len, vocab", [
    ("malach", 2, 84, 17), ("malach_joined", 2, 76, 117), ("malach", 3, 183, 17), ("malach_joined", 3, 165, 117),
    ("malach", 4, 338, 17), ("malach_joined", 4, 306, 117), ("sequential", 2, 25, 15), ("none", 3, 14, 15)])
def test_layout(chain, digits, seq_len, vocab):
    dm = task(f"data.digits={digits}", f"data.chain={chain}")
    assert (dm.vocab_size, dm.prompt_len, dm.seq_len, dm.answer_len) == (vocab, 2 * digits + 2, seq_len, 2 * digits)
    # d operand digits, d - 1 pluses and 2 brackets per expansion; 7 + i + j tokens a term (5 + i + j joined),
    # i + j + 2 digits a value; a ``+`` between terms and between values; ``*`` and three ``=``
    d = digits
    powers = d * (d + 1) // 2
    expansions = 2 * (2 * d + powers + d - 1 + 2)
    terms = d * d * (7 if chain == "malach" else 5) + d * d * (d - 1) + d * d - 1
    values = 2 * d * d + d * d * (d - 1) + d * d - 1
    if chain in MALACH:
        assert seq_len == 2 * d + 2 + expansions + 1 + terms + values + 3 + 2 * d


def test_split_and_operands_do_not_depend_on_the_chain():
    prompts = {}
    for chain in ("none", "sequential", *MALACH):
        dm = task("data.digits=2", f"data.chain={chain}", "seed=11")
        train = dm.generate(Ticket(3, 4, 0, 1), CPU).tokens[0].reshape(-1, dm.seq_len)[:, :dm.prompt_len]
        prompts[chain] = (train, dm.eval_set(CPU)[0, :, :dm.prompt_len])
    for chain in MALACH:
        assert all(torch.equal(x, y) for x, y in zip(prompts[chain], prompts["sequential"]))
    for tokens, held in zip(prompts["malach"], (False, True)):
        a, b = tokens[:, 0] * 10 + tokens[:, 1], tokens[:, 3] * 10 + tokens[:, 4]
        assert bool((held_out(11, a, b) == held).all())


@pytest.mark.parametrize("chain", ["none", "sequential", "malach", "malach_joined"])
def test_the_declared_layout_is_the_length_written(chain):
    for digits in range(1, 10):
        one = torch.ones(1, dtype=torch.int64)
        layout = MultiplyTask.layout(MultiplyConfig(digits=digits, chain=chain))
        assert sequences(one, one, digits, chain).shape[1] == layout.seq_len, digits
