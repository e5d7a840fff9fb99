"""OSDiff's two entropy models, with CompressAI's narrow API: update / compress / decompress.

- `EntropyBottleneck` codes z with a learned factorized prior, one CDF per channel, symbols
  taken around the channel's learned median.
- `GaussianConditional` turns the scales the entropy-parameter networks predict into indexes
  of 64 fixed Gaussian CDFs; the checkerboard slice loop that uses it is runtime/latent_codec.py.

Tables are always recomputed from the learned parameters (as the reference's
`update(force=True)` does), never read from a checkpoint's CDF buffers, so stale buffers can
never desynchronize encoder and decoder.

Canonical tables. The tables are integers, and one flipped rounding on the way to them changes
the stream, so they must come out bit-identical on every machine. The formulas are compressai
1.2.4's (`get_scale_table`, `GaussianConditional.update`, `EntropyBottleneck.update`), in the
reference's order of float32 operations, but every operation is evaluated as its correctly
rounded float32 result (runtime/f32.py) instead of by torch's kernels, whose last bits depend on
the CPU's SIMD level. Where the reference's vectorized CPU kernels contract a multiply and an add
into one rounding (torch.linspace, and the GEMM under torch.matmul), the canonical derivation
does the same, as a fused multiply-add. Measured: these tables equal the tables of the shared
golden set (made by the original implementation on an AVX-512 CPU) in every entry; torch's own
kernels on an AVX2 CPU differ from them in 9 entries of the bottleneck's table of that set, and
golden sets the original made on other machines differ from both (docs/entropy-tables.md).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from types import ModuleType

import mpmath
import numpy as np
import torch

from osdiff.config import EntropyConfig
from osdiff.runtime import f32
from osdiff.runtime.coder import CdfTables, Decoder, Encoder, native, quantized_cdf

# The arithmetic a derivation runs in: runtime/f32.py (canonical, the default everywhere) or
# runtime/f32_native.py (torch's float32 kernels of this CPU, for the original's raw format).
Arithmetic = ModuleType


def scale_table(cfg: EntropyConfig, ar: Arithmetic = f32) -> np.ndarray:
    """compressai's get_scale_table: exp(linspace(log(scale_min), log(scale_max), levels)),
    float32 (levels,)."""
    return ar.exp(ar.linspace(ar.log(cfg.scale_min), ar.log(cfg.scale_max), cfg.scale_levels))


def scale_indexes(scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the Gaussian CDF for each scale: the smallest k with scale <= table[k], capped.
    `table` lives on the scales' device.

    The same index for every input as compressai's build_indexes (lower-bound the scale to
    table[0], then subtract one per table entry >= the scale), in one bucketize instead of 63
    passes. NaN maps to the last table, as it does there. Comparisons only: exact everywhere.
    """
    scales = torch.nan_to_num(scales.float(), nan=math.inf).clamp_min(table[0])
    return torch.bucketize(scales, table[:-1], right=False).to(torch.int32)


class GaussianConditional:
    def __init__(self, cfg: EntropyConfig = EntropyConfig(), arithmetic: Arithmetic = f32) -> None:
        self.cfg = cfg
        scales, self.tables = _gaussian(cfg, arithmetic)
        self.scale_table = torch.tensor(scales)
        self.scale_index = native().ScaleIndex(scales)  # the native mapping, for build_indexes and the coding rounds
        self._table_on: dict[torch.device, torch.Tensor] = {}  # the scale table per accelerator, copied once

    def build_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        """Index of the Gaussian CDF for each scale: uint8, the scales' shape and device.

        The same index for every float as compressai's build_indexes (lower-bound the scale to
        table[0], then subtract one per table entry >= the scale; NaN maps to the last table):
        exact float compares, so every machine derives the same indexes. On the CPU by
        runtime/native/scale_index.hpp, a twentieth of the time of torch.bucketize (whose
        branchy search mispredicts on real scales); on an accelerator by `scale_indexes`, so
        that only the one-byte indexes cross the bus.
        """
        if scales.device.type == "cpu":
            return torch.from_numpy(self.scale_index(np.ascontiguousarray(scales.detach().float().numpy())))
        if scales.device not in self._table_on:
            self._table_on[scales.device] = self.scale_table.to(scales.device)
        return scale_indexes(scales, self._table_on[scales.device]).to(torch.uint8)

    def with_tables(self, scale_table: np.ndarray, tables: CdfTables) -> "GaussianConditional":
        """A copy that codes with tables given instead of derived: float32 (levels,) scales and
        one CDF per scale, e.g. the ones a golden set's machine derived (osdiff verify-reference
        checks the coding with them, whatever this machine derives). ValueError if they do not
        fit together."""
        scales = np.ascontiguousarray(scale_table, dtype=np.float32)
        if scales.ndim != 1 or len(tables.cdfs) != scales.size:
            raise ValueError(f"{scales.size} scales but {len(tables.cdfs)} CDF rows")
        other = copy.copy(self)
        other.scale_table, other.tables = torch.from_numpy(scales.copy()), tables
        other.scale_index = native().ScaleIndex(scales)
        other._table_on = {}
        return other


@functools.lru_cache(maxsize=8)
def _gaussian(cfg: EntropyConfig, ar: Arithmetic) -> tuple[np.ndarray, CdfTables]:
    """The scale table and its CDFs depend on the config alone: derived once per process."""
    table = scale_table(cfg, ar)
    return table, gaussian_tables(table, cfg.tail_mass, cfg.precision, ar)


def gaussian_tables(table: np.ndarray, tail_mass: float = 1e-9, precision: int = 16, ar: Arithmetic = f32) -> CdfTables:
    """compressai 1.2.4 GaussianConditional.update(): one discretized N(0, s) per scale of the
    float32 `table`, its support ceil(s * multiplier) on either side, the two tails' mass
    appended as one last symbol."""
    # scipy.stats.norm.ppf(tail_mass / 2) in the reference: a float64 value, which torch rounds
    # to float32 when it multiplies the table
    with mpmath.workprec(256):
        multiplier = float(-mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(tail_mass / 2) - 1))
    pmf_center = np.ceil(ar.mul(table, np.float32(multiplier))).astype(np.int64)
    pmf_length = 2 * pmf_center + 1
    samples = np.abs(np.arange(int(pmf_length.max()))[None, :] - pmf_center[:, None]).astype(np.float32)
    scales = table[:, None]
    upper = _standard_normal_cdf(ar.div(ar.sub(0.5, samples), scales), ar)
    lower = _standard_normal_cdf(ar.div(ar.sub(-0.5, samples), scales), ar)
    pmf = ar.sub(upper, lower)
    tail = ar.mul(2, lower[:, :1])
    cdfs = [quantized_cdf(np.concatenate((pmf[i, :n], tail[i])), precision).tolist()
            for i, n in enumerate(pmf_length.tolist())]
    return CdfTables(cdfs=cdfs, offsets=(-pmf_center).tolist())


def _standard_normal_cdf(x: np.ndarray, ar: Arithmetic) -> np.ndarray:
    # erfc keeps the far tails precise; the constant and order follow compressai
    return ar.mul(0.5, ar.erfc(ar.mul(float(-(2**-0.5)), x)))


def tables_digest(gaussian: GaussianConditional, eb: "EntropyBottleneck") -> bytes:
    """SHA-256 of everything that decides a symbol besides the networks: the scale table, and
    both models' CDF rows and offsets (int32, little-endian)."""
    h = hashlib.sha256(b"osdiff-tables-v1")
    h.update(gaussian.scale_table.numpy().astype("<f4").tobytes())
    for tables in (gaussian.tables, eb.tables):
        for row, offset in zip(tables.cdfs, tables.offsets):
            h.update(np.asarray([len(row), offset, *row], dtype="<i4").tobytes())
    return h.digest()


class EntropyBottleneck:
    """The factorized prior for z (Ballé et al. 2018), inference only.

    `params` holds the learned density: matrices[i] (C, out, in), biases[i], factors[i] and
    quantiles (C, 1, 3), whose middle column is the median that symbols are taken around.
    """

    def __init__(self, params: dict[str, torch.Tensor], precision: int = 16, arithmetic: Arithmetic = f32) -> None:
        self.params = {k: v.detach().float().cpu() for k, v in params.items()}  # exact for fp16/bf16 files
        self.precision = precision
        self.arithmetic = arithmetic
        self.channels = self.params["quantiles"].shape[0]
        self.update()

    @property
    def medians(self) -> torch.Tensor:
        return self.params["quantiles"][:, 0, 1]

    def update(self) -> None:
        """Tables by compressai 1.2.4's formula (reference README 7.7), canonical float32 (see
        the module docstring): it differs from >= 1.2.5 in the tails (sign-flipped sigmoids),
        which changes the z string for some weights."""
        ar = self.arithmetic
        q = self.params["quantiles"].numpy()
        medians = q[:, 0, 1]
        minima = np.maximum(np.ceil(ar.sub(medians, q[:, 0, 0])), 0).astype(np.int64)
        maxima = np.maximum(np.ceil(ar.sub(q[:, 0, 2], medians)), 0).astype(np.int64)
        pmf_start = ar.sub(medians, minima)
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max())
        if max_length > (1 << 16):
            raise ValueError(f"entropy bottleneck support of {max_length} symbols: the quantiles are broken")
        samples = ar.add(np.arange(max_length, dtype=np.float32)[None, None, :], pmf_start[:, None, None])
        lower = self.logits_cumulative(ar.sub(samples, 0.5))
        upper = self.logits_cumulative(ar.add(samples, 0.5))
        sign = -np.sign(ar.add(lower, upper))
        pmf = np.abs(ar.sub(ar.sigmoid(sign * upper), ar.sigmoid(sign * lower)))[:, 0, :]
        tail = ar.add(ar.sigmoid(lower[:, 0, :1]), ar.sigmoid(-upper[:, 0, -1:]))
        cdfs = [quantized_cdf(np.concatenate((pmf[i, :n], tail[i])), self.precision).tolist()
                for i, n in enumerate(pmf_length.tolist())]
        self.tables = CdfTables(cdfs=cdfs, offsets=(-minima).tolist())

    def with_tables(self, tables: CdfTables) -> "EntropyBottleneck":
        """A copy that codes with tables given instead of derived (one CDF per channel), e.g.
        a golden set's (see GaussianConditional.with_tables). ValueError if the count differs."""
        if len(tables.cdfs) != self.channels:
            raise ValueError(f"{self.channels} channels but {len(tables.cdfs)} CDF rows")
        other = copy.copy(self)
        other.tables = tables
        return other

    def logits_cumulative(self, x: np.ndarray) -> np.ndarray:
        """The learned cumulative density's logits at x (C, 1, n), canonical float32
        (Balle et al. 2018, eq. 6 ff.; compressai's _logits_cumulative)."""
        ar = self.arithmetic
        p = {k: v.numpy() for k, v in self.params.items()}
        n = sum(1 for k in p if k.startswith("matrices."))
        for i in range(n):
            x = ar.matmul(ar.softplus(p[f"matrices.{i}"]), x)
            x = ar.add(x, p[f"biases.{i}"])
            if i < n - 1:
                x = ar.add(x, ar.mul(ar.tanh(p[f"factors.{i}"]), ar.tanh(x)))
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
