"""Sparse parity as a next-token task, with or without the intermediate steps (chain of thought).

A sequence is ``x_1 .. x_n, SEP, chain``: the n input bits, a separator token, then the completion,
whose last token is the answer (the parity of x over the secret). ``data.chain`` picks the steps:

* ``none``: the answer alone;
* ``sequential``: the prefix parities in the secret's order, x_s1, x_s1^x_s2, ..., the last being
  the answer (k tokens; this is the kernel's own "tokens" layout);
* ``tree``: a balanced tree of XORs, written breadth first (Wies et al. 2023, Kim & Suzuki 2024):
  the XORs of neighbouring pairs of secret bits, then of pairs of those, up to the root. A level with
  an odd count carries its last node up unchanged (it is not written again), so a tree has k - 1
  nodes for any k (k = 1: the answer alone).

The parity task (datamodules/parity.py) writes these sequences for sequence models; label noise flips
the answer token only (the chain stays the noiseless one).
"""
import torch

VOCAB_SIZE = 3  # tokens 0 and 1 (bits), 2 (separator)
CHAINS = ("none", "sequential", "tree")


def tree_plan(k: int) -> list[tuple[int, int]]:
    """The tree's nodes in breadth-first order, as pairs of operand ids.

    Ids 0..k-1 are the secret bits in secret order; node j of the plan gets id k + j.
    """
    level, plan = list(range(k)), []
    while len(level) > 1:
        above = []
        for a, b in zip(level[0::2], level[1::2]):
            plan.append((a, b))
            above.append(k + len(plan) - 1)
        if len(level) % 2:
            above.append(level[-1])  # the odd node rises unchanged
        level = above
    return plan


def tree_chain(secret_bits: torch.Tensor) -> torch.Tensor:
    """The tree's node values (..., max(k - 1, 1)) for secret bits (..., k) in secret order."""
    k = secret_bits.shape[-1]
    if k == 1:
        return secret_bits.clone()
    values = list(secret_bits.unbind(-1))
    for a, b in tree_plan(k):
        values.append(values[a] ^ values[b])
    return torch.stack(values[k:], dim=-1)


def chain_len(chain: str, k: int) -> int:
    """Completion tokens (answer included) of a chain format."""
    return {"none": 1, "sequential": k, "tree": max(k - 1, 1)}[chain]
