"""Sparse parity as a next-token task, with or without the intermediate steps (chain of thought).

A sequence is ``x_1 .. x_n, SEP, chain``: the n input bits, a separator token, then the completion,
whose last token is the answer (the parity of x over the secret). ``data.chain`` picks the steps:

* ``none``: the answer alone;
* ``sequential``: the prefix parities in the secret's order, c_1 = x_s1, c_i = c_{i-1} ^ x_si, the last
  being the answer (k tokens; this is the kernel's own "tokens" layout). ``data.chain_stride=b`` folds b
  secret bits into each token instead of one: the parities of the first b, 2b, 3b, ... secret bits, the
  last block possibly shorter, so ceil(k / b) tokens (b >= k: the answer alone);
* ``tree``: a balanced tree of XORs, written breadth first (Wies et al. 2023, Kim & Suzuki 2024):
  the XORs of neighbouring pairs of secret bits, then of pairs of those, up to the root. A level with
  an odd count carries its last node up unchanged (it is not written again), so a tree has k - 1
  nodes for any k (k = 1: the answer alone);
* ``gates``: the sequential chain as a circuit of linear threshold gates, one gate per token (Malach
  2024): x_s1, then for each i = 2..k the three tokens AND(c_{i-1}, x_si) = [c_{i-1} + x_si >= 2],
  OR(c_{i-1}, x_si) = [c_{i-1} + x_si >= 1] and c_i = [OR - AND >= 1], the XOR; 1 + 3(k - 1) tokens.
  With k = 3 and secret bits (1, 1, 0): ``1, 1 1 0, 0 0 0`` (x_s1; AND OR XOR with x_s2; with x_s3).

The parity task (datamodules/parity.py) writes these sequences for sequence models; label noise flips
the answer token only (the chain stays the noiseless one).
"""
import torch


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


def gates_chain(secret_bits: torch.Tensor) -> torch.Tensor:
    """The threshold-gate tokens (..., 3k - 2) for secret bits (..., k) in secret order."""
    carry, tokens = secret_bits[..., 0], [secret_bits[..., 0]]
    for bit in secret_bits[..., 1:].unbind(-1):
        both, either = carry & bit, carry | bit
        carry = either - both  # [OR - AND >= 1]: OR - AND is 0 or 1
        tokens += [both, either, carry]
    return torch.stack(tokens, dim=-1)


def stride_ends(k: int, stride: int) -> list[int]:
    """Which prefix parities (0-based, secret order) a sequential chain of ``stride`` writes: the answer last."""
    return [min(end, k) - 1 for end in range(stride, k + stride, stride)]


def completion(chain: str, secret_bits: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The noiseless completion (..., chain_len) of a chain format for secret bits (..., k) in secret order."""
    if chain == "tree":
        return tree_chain(secret_bits)
    if chain == "gates":
        return gates_chain(secret_bits)
    prefix = secret_bits.cumsum(-1) % 2
    if chain == "none":
        return prefix[..., -1:]
    return prefix[..., stride_ends(secret_bits.shape[-1], stride)]

