"""OSDiff's two entropy models, with CompressAI's narrow API: update / compress / decompress.

- `EntropyBottleneck` codes z with a learned factorized prior, one CDF per channel, symbols
  taken around the channel's learned median.
- `GaussianConditional` turns the scales the entropy-parameter networks predict into indexes
  of 64 fixed Gaussian CDFs; the checkerboard slice loop that uses it is runtime/latent_codec.py.

Tables are always recomputed from the learned parameters (as the reference's
`update(force=True)` does), never read from a checkpoint's CDF buffers, so stale buffers can
never desynchronize encoder and decoder. Both formulas mirror compressai 1.2.4 operation by
operation in float32 torch: the tables are integers, and one flipped rounding changes the
stream.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from osdiff.config import EntropyConfig
from osdiff.runtime.coder import CdfTables, Decoder, Encoder, native, quantized_cdf


def scale_table(cfg: EntropyConfig) -> torch.Tensor:
    """The 64 log-spaced Gaussian scales (compressai's get_scale_table), float32."""
    return torch.exp(torch.linspace(math.log(cfg.scale_min), math.log(cfg.scale_max), cfg.scale_levels))


class GaussianConditional:
    def __init__(self, cfg: EntropyConfig = EntropyConfig()) -> None:
        self.cfg = cfg
        self.scale_table = scale_table(cfg)
        self.tables = gaussian_tables(self.scale_table, cfg.tail_mass, cfg.precision)
        self._scale_index = native().ScaleIndex(self.scale_table.numpy())

    def build_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        """Index of the Gaussian CDF for each scale, uint8 on the CPU, the scales' shape.

        The same index for every float as compressai's build_indexes (lower-bound the scale to
        table[0], then subtract one per table entry >= the scale; NaN maps to the last table),
        computed by runtime/native/scale_index.hpp on the CPU whatever the scales' device: it
        is exact float compares, so every machine derives the same indexes, and it costs less
        than a twentieth of torch.bucketize, whose branchy search mispredicts on real scales.
        """
        values = np.ascontiguousarray(scales.detach().float().cpu().numpy())
        return torch.from_numpy(self._scale_index(values))


def gaussian_tables(table: torch.Tensor, tail_mass: float = 1e-9, precision: int = 16) -> CdfTables:
    """compressai 1.2.4 GaussianConditional.update(): one discretized N(0, s) per scale."""
    multiplier = -NormalDist().inv_cdf(tail_mass / 2)  # == scipy.stats.norm.ppf, bit for bit
    pmf_center = torch.ceil(table * multiplier).int()
    pmf_length = 2 * pmf_center + 1
    max_length = int(pmf_length.max())
    samples = torch.abs(torch.arange(max_length).int() - pmf_center[:, None]).float()
    scales = table.unsqueeze(1).float()
    upper = _standard_normal_cdf((0.5 - samples) / scales)
    lower = _standard_normal_cdf((-0.5 - samples) / scales)
    pmf = upper - lower
    tail = 2 * lower[:, :1]
    cdfs = []
    for i, n in enumerate(pmf_length.tolist()):
        cdfs.append(quantized_cdf(torch.cat((pmf[i, :n], tail[i])).numpy(), precision).tolist())
    return CdfTables(cdfs=cdfs, offsets=(-pmf_center).tolist())


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # erfc keeps the far tails precise; the constant and order follow compressai
    return 0.5 * torch.erfc(float(-(2**-0.5)) * x)


class EntropyBottleneck:
    """The factorized prior for z (Ballé et al. 2018), inference only.

    `params` holds the learned density: matrices[i] (C, out, in), biases[i], factors[i] and
    quantiles (C, 1, 3), whose middle column is the median that symbols are taken around.
    """

    def __init__(self, params: dict[str, torch.Tensor], precision: int = 16) -> None:
        self.params = {k: v.detach().float().cpu() for k, v in params.items()}
        self.precision = precision
        self.channels = self.params["quantiles"].shape[0]
        self.update()

    @property
    def medians(self) -> torch.Tensor:
        return self.params["quantiles"][:, 0, 1]

    def update(self) -> None:
        """Tables by compressai 1.2.4's formula (README 7.7): it differs from >= 1.2.5 in the
        tails (sign-flipped sigmoids), which changes the z string for some weights."""
        q = self.params["quantiles"]
        medians = q[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - q[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(q[:, 0, 2] - medians).int(), min=0)
        pmf_start = medians - minima
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max())
        if max_length > (1 << 16):
            raise ValueError(f"entropy bottleneck support of {max_length} symbols: the quantiles are broken")
        samples = torch.arange(max_length)[None, :] + pmf_start[:, None, None]
        lower = self._logits_cumulative(samples - 0.5)
        upper = self._logits_cumulative(samples + 0.5)
        sign = -torch.sign(lower + upper)
        pmf = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))[:, 0, :]
        tail = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
        cdfs = []
        for i, n in enumerate(pmf_length.tolist()):
            cdfs.append(quantized_cdf(torch.cat((pmf[i, :n], tail[i])).numpy(), self.precision).tolist())
        self.tables = CdfTables(cdfs=cdfs, offsets=(-minima).tolist())

    def _logits_cumulative(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        n = sum(1 for k in p if k.startswith("matrices."))
        for i in range(n):
            x = torch.matmul(F.softplus(p[f"matrices.{i}"]), x)
            x = x + p[f"biases.{i}"]
            if i < n - 1:
                x = x + torch.tanh(p[f"factors.{i}"]) * torch.tanh(x)
        return x

    def _indexes(self, shape: tuple[int, ...]) -> np.ndarray:
        b, c, h, w = shape
        return np.broadcast_to(np.arange(c, dtype=np.int32)[None, :, None, None], (b, c, h, w))

    def compress(self, z: torch.Tensor) -> tuple[bytes, torch.Tensor, np.ndarray]:
        """z (1, C, h, w) -> (string, z_hat, the coded symbols)."""
        if z.shape[0] != 1 or z.shape[1] != self.channels:
            raise ValueError(f"z must be 1 x {self.channels} x h x w, got {tuple(z.shape)}")
        medians = self.medians.view(1, -1, 1, 1)
        z = z.detach().float().cpu()
        if not torch.isfinite(z).all():
            raise ValueError("z is not finite")
        symbols = torch.round(z - medians).int()
        encoder = Encoder()
        encoder.encode(symbols.numpy(), self._indexes(tuple(z.shape)), self.tables)
        return encoder.flush(), symbols.float() + medians, symbols.numpy()

    def decompress(self, string: bytes, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
        """-> (z_hat (1, C, h, w), the decoded symbols)."""
        shape = (1, self.channels, *size)
        indexes = self._indexes(shape)
        symbols = Decoder(string, self.tables, indexes.size).decode(indexes).reshape(shape)
        return torch.from_numpy(symbols).float() + self.medians.view(1, -1, 1, 1), symbols
