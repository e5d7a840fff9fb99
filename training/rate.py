"""The rate term of the OSDiff objective: differentiable likelihoods of the two entropy models.

The coder (runtime/entropy.py, runtime/latent_codec.py) spends -log2 of the probability its
integer CDF tables give each symbol. Training needs the same quantity as a differentiable
function of the networks' outputs (Ballé et al. 2018, as CompressAI's `EntropyBottleneck` and
`GaussianConditional` compute it in training; OSDiff's `model/lfgcm.py` calls those):

- z: a learned factorized density per channel, `FactorizedPrior` (the trainable side of
  runtime.entropy.EntropyBottleneck, same parameters, same compressai 1.2.4 formula).
- y: a Gaussian N(mean, max(scale, 0.11)) per element, integrated over the unit bin.

Noisy values (x + U(-0.5, 0.5)) give the training rate; rounded values give what the coder
really spends, up to the 16-bit CDF quantization and the 64-entry scale table (measured in
training/evaluate.py against real streams).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LIKELIHOOD_BOUND = 1e-9  # CompressAI's likelihood lower bound: keeps log2 finite


class _LowerBound(torch.autograd.Function):
    """max(x, bound), with CompressAI's gradient: it passes where x >= bound or where the
    gradient would push x up, so a scale stuck under the bound can still leave it."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through, None


def lower_bound(x: Tensor, bound: float) -> Tensor:
    return _LowerBound.apply(x, bound)


def add_noise(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x + U(-0.5, 0.5): the training proxy of rounding (paper eq. 3's Q in training)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 0.5
    return x + noise


def ste_round(x: Tensor) -> Tensor:
    """round(x) forward (half to even, as the coder), identity backward."""
    return x + (torch.round(x) - x).detach()


def gaussian_likelihood(y: Tensor, scales: Tensor, means: Tensor, scale_min: float = 0.11) -> Tensor:
    """P(bin of y) under N(mean, max(scale, scale_min)): Phi((0.5 - |y - mean|) / s) -
    Phi((-0.5 - |y - mean|) / s), lower-bounded by 1e-9 (CompressAI's GaussianConditional
    ._likelihood; the symmetric form keeps the tails precise). All shapes equal; float32."""
    s = lower_bound(scales, scale_min)
    v = (y - means).abs()
    upper = _normal_cdf((0.5 - v) / s)
    lower = _normal_cdf((-0.5 - v) / s)
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-(2**-0.5) * x)


def bits(likelihoods: Tensor) -> Tensor:
    """Total information content, in bits."""
    return -torch.log2(likelihoods).sum()


class FactorizedPrior(nn.Module):
    """The trainable factorized density of z (Ballé et al. 2018, appendix 6.1): per channel a
    monotone function c(x) = sigmoid(logits_cumulative(x)), likelihood c(x+0.5) - c(x-0.5).

    Parameter names and shapes are those of runtime.entropy.EntropyBottleneck (compressai >=
    1.2.5 spelling: `matrices.i` (C, out, in), `biases.i`, `factors.i`, `quantiles` (C, 1, 3)),
    so `state_dict()` goes into a checkpoint under `preprocess_model.entropy_bottleneck.`.
    The quantiles are trained by `aux_loss` only (their own optimizer, as in OSDiff).
    """

    def __init__(self, channels: int, init_scale: float = 10.0, filters: tuple[int, ...] = (3, 3, 3, 3),
                 tail_mass: float = 1e-9):
        super().__init__()
        self.channels, self.tail_mass = channels, tail_mass
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = float(np.log(np.expm1(1 / scale / dims[i + 1])))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0.0, init_scale]).repeat(channels, 1, 1))
        target = math.log(2 / tail_mass - 1)
        self.register_buffer("target", torch.tensor([-target, 0.0, target]), persistent=False)

    @property
    def medians(self) -> Tensor:
        return self.quantiles[:, 0, 1].detach()

    def logits_cumulative(self, x: Tensor, stop_gradient: bool = False) -> Tensor:
        """x (C, 1, n) -> (C, 1, n): the same arithmetic as runtime.entropy.EntropyBottleneck."""
        for i, matrix in enumerate(self.matrices):
            m, b = F.softplus(matrix), self.biases[i]
            if stop_gradient:
                m, b = m.detach(), b.detach()
            x = torch.matmul(m, x) + b
            if i < len(self.factors):
                f = self.factors[i].detach() if stop_gradient else self.factors[i]
                x = x + torch.tanh(f) * torch.tanh(x)
        return x

    def likelihood(self, z: Tensor) -> Tensor:
        """P(bin of z) for z (B, C, h, w) (noisy or rounded about the medians), lower-bounded by
        1e-9. compressai 1.2.4's sign trick: sigmoids on the side where they are not
        saturated."""
        b, c, h, w = z.shape
        x = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self.logits_cumulative(x - 0.5)
        upper = self.logits_cumulative(x + 0.5)
        sign = -torch.sign(lower + upper).detach()
        lik = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        lik = lower_bound(lik, LIKELIHOOD_BOUND)
        return lik.reshape(c, b, h, w).permute(1, 0, 2, 3)

    def aux_loss(self) -> Tensor:
        """Moves the quantiles to the tail_mass/2, 0.5 and 1 - tail_mass/2 points of the
        density (CompressAI's EntropyBottleneck.loss); only the quantiles get its gradient."""
        logits = self.logits_cumulative(self.quantiles, stop_gradient=True)
        return (logits - self.target).abs().sum()

    def quantize(self, z: Tensor) -> Tensor:
        """round(z - median) + median, straight-through: what the coder transmits."""
        medians = self.medians.view(1, -1, 1, 1)
        return ste_round(z - medians) + medians
