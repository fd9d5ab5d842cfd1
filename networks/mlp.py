"""An ensemble of E independent two-layer MLPs, held as batched tensors (the parity classifier's network).

Member e computes f_e(x) = w2_e . act(w1_e x + b1_e) + b2_e with w1 (E, width, n), b1 (E, width), w2 (E, width),
b2 (E,). ``forward`` is the definition: autograd through it is how the network trains. The activation and its
derivative are written once, here (``act``, ``act_backward_``); the hand-written gradient
(lightning_modules/parity_mlp.py) and the fused steps (kernels/mlp_step.py) use them, are tested against
autograd through ``forward``, and are checked against it when a run starts.
"""
import hashlib
import math

import torch
from torch import nn

ACTIVATIONS = ("relu", "sin", "poly")
INITS = ("uniform", "gaussian", "sign", "sparse")


class MLPEnsemble(nn.Module):
    def __init__(self, members: int, n: int, width: int, activation: str = "relu", power: int = 2):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.activation, self.power = activation, power
        self.w1 = nn.Parameter(torch.zeros(members, width, n))
        self.b1 = nn.Parameter(torch.zeros(members, width))
        self.w2 = nn.Parameter(torch.zeros(members, width))
        self.b2 = nn.Parameter(torch.zeros(members))

    def act(self, z: torch.Tensor) -> torch.Tensor:
        """h = act(z); ReLU overwrites z (its derivative needs only h)."""
        if self.activation == "relu":
            return z.relu_()
        if self.activation == "sin":
            return z.sin()
        if self.activation == "poly":
            return z.pow(self.power)
        raise ValueError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def act_backward_(self, dz: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """dz * act'(z), in place in dz, from z and h = act(z) (ReLU reads h only: z may be h)."""
        if self.activation == "relu":  # what autograd runs for relu: dz where h > 0, else 0
            return torch.ops.aten.threshold_backward.grad_input(dz, h, 0, grad_input=dz)
        if self.activation == "sin":
            return dz.mul_(z.cos())
        if self.activation == "poly":
            return dz.mul_(z.pow(self.power - 1).mul_(self.power))
        raise ValueError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """w1 x + b1, (E, B, width), for inputs x (E, B, n)."""
        return torch.bmm(x, self.w1.transpose(1, 2)).add_(self.b1.unsqueeze(1))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """w2 . h + b2, (E, B), for hidden activations h (E, B, width)."""
        # w2 h^T, a row per member: far faster than h w2 as a batched matrix-vector product
        return torch.baddbmm(self.b2.view(-1, 1, 1), self.w2.unsqueeze(1), h.transpose(1, 2)).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs f (E, B) for inputs x (E, B, n)."""
        return self.readout(self.act(self.pre_activations(x)))


def member_generator(seed: int, member: int) -> torch.Generator:
    """The init RNG of ensemble member ``member``: a function of (seed, member) only."""
    digest = hashlib.sha256(f"paritylab-init:{seed}:{member}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_member(seed: int, member: int, n: int, width: int, init: str = "uniform",
                sparsity: int = 2) -> tuple[torch.Tensor, ...]:
    """(w1, b1, w2, b2) of one member: uniform (Xavier weights, PyTorch's default biases), gaussian (Kaiming, zero
    biases), sign (+-1/sqrt(fan-in)), or sparse (each neuron connected to ``sparsity`` random inputs, Edelman et
    al. 2023)."""
    g = member_generator(seed, member)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    def signs(shape):
        return torch.randint(0, 2, shape, generator=g).float() * 2 - 1

    if init == "uniform":
        w1 = uniform((width, n), math.sqrt(6 / (n + width)))
        w2 = uniform((width,), math.sqrt(6 / (width + 1)))
        b1, b2 = uniform((width,), 1 / math.sqrt(n)), uniform((), 1 / math.sqrt(width))
    elif init == "gaussian":
        w1 = torch.randn((width, n), generator=g) * math.sqrt(2 / n)
        w2 = torch.randn((width,), generator=g) * math.sqrt(2 / width)
        b1, b2 = torch.zeros(width), torch.zeros(())
    elif init == "sign":
        w1, w2 = signs((width, n)) / math.sqrt(n), signs((width,)) / math.sqrt(width)
        b1, b2 = torch.zeros(width), torch.zeros(())
    elif init == "sparse":
        chosen = torch.rand((width, n), generator=g).argsort(dim=1)[:, :sparsity]
        w1 = torch.zeros(width, n).scatter_(1, chosen, signs((width, sparsity)) / math.sqrt(sparsity))
        w2 = signs((width,)) / math.sqrt(width)
        b1, b2 = torch.zeros(width), torch.zeros(())
    else:
        raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
    return w1, b1, w2, b2


def mlp_ensemble(seed: int, members: list[int], n: int, width: int, activation: str = "relu", power: int = 2,
                 init: str = "uniform", sparsity: int = 2) -> MLPEnsemble:
    """The ensemble of ``members``, each initialised from (seed, member) alone."""
    net = MLPEnsemble(len(members), n, width, activation, power)
    with torch.no_grad():
        for p, t in zip(net.parameters(), zip(*(init_member(seed, m, n, width, init, sparsity) for m in members))):
            p.copy_(torch.stack(t))
    return net
