"""CompressAI's rANS range coder, called so that bad input cannot crash the process.

We use two C++ pieces of CompressAI: the rANS coder (`compressai.ans`) and the pmf -> 16-bit
CDF quantizer (`compressai._CXX.pmf_to_quantized_cdf`). We do not import CompressAI's Python
package: its `__init__` imports the whole training stack (torchvision, torch-geometric,
matplotlib, ...), which is slow and on CPU-only torch builds does not import at all. Both
extensions are self-contained pybind11 modules, so they are loaded straight from the installed
distribution.

The coder itself trusts its caller completely, so this module is the only place that calls it
and it never does so with arguments that can hurt it:
- encoding fewer than 3 symbols overflows the coder's output buffer (it reserves one 32-bit
  word per symbol; the flush alone writes two): streams are padded to MIN_SYMBOLS;
- indexes outside the table list, or tables that are not strictly increasing 16-bit CDFs, are
  read out of bounds: both are validated here;
- the decoder does no bounds checks on the stream: a truncated or forged string makes it read
  past the end. Strings are checked for the shape the encoder always produces (whole 32-bit
  words, a valid initial state) and decoded from a copy followed by zero padding, so that the
  reads a corrupt string causes land in memory we own. A corrupt string then decodes to wrong
  symbols, which the stream's check value (runtime/bitstream.py) rejects.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np

PRECISION = 16
MIN_SYMBOLS = 3
# |symbol| beyond this means the latent is not finite or the stream is garbage; a trained
# OSDiff latent is within a few hundred.
MAX_ABS_SYMBOL = 1 << 20
# Zero bytes appended behind a string before decoding. Past the end of its data the decoder
# consumes at most one 32-bit word per symbol plus what escape codes read; two words per
# symbol keeps even garbage strings inside the padding.
PAD_BYTES_PER_SYMBOL = 8
_PAD_MIN = 1 << 16


class StreamError(ValueError):
    """The bitstream is corrupt, truncated, or was not made by this model."""


def _compressai_extension(name: str) -> ModuleType:
    full = f"compressai.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("compressai")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("compressai is not installed: pip install compressai")
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, name + suffix)
            if os.path.exists(path):
                loader = importlib.machinery.ExtensionFileLoader(full, path)
                ext_spec = importlib.util.spec_from_file_location(full, path, loader=loader)
                assert ext_spec is not None
                module = importlib.util.module_from_spec(ext_spec)
                loader.exec_module(module)
                sys.modules[full] = module
                return module
    raise ImportError(f"compressai is installed but its C++ extension {name!r} is missing")


ans = _compressai_extension("ans")


def quantized_cdf(pmf: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """CompressAI's pmf -> quantized CDF (every symbol keeps a frequency >= 1)."""
    pmf = np.asarray(pmf, dtype=np.float32)
    if pmf.ndim != 1 or pmf.size < 2 or not np.all(np.isfinite(pmf)) or np.any(pmf < 0) or pmf.sum() <= 0:
        raise ValueError("cannot build a CDF from a pmf that is not finite, non-negative and non-zero")
    cdf = _compressai_extension("_CXX").pmf_to_quantized_cdf(pmf.tolist(), precision)
    return np.asarray(cdf, dtype=np.int32)


@dataclass(frozen=True)
class CdfTables:
    """A list of quantized CDFs in the form the coder takes.

    `cdfs[i]` is truncated to its length: the coder converts every row it is given from Python
    on every call, so padded rows (3133 entries each for the Gaussian tables) would cost more
    than the decoding itself.
    """

    cdfs: list[list[int]]
    offsets: list[int]

    def __post_init__(self) -> None:
        if not self.cdfs or len(self.cdfs) != len(self.offsets) or len(self.cdfs) > (1 << 16):
            raise ValueError("CDF tables: need 1..65536 rows and one offset per row")
        for row in self.cdfs:
            c = np.asarray(row, dtype=np.int64)
            if c.size < 3 or c[0] != 0 or c[-1] != (1 << PRECISION) or np.any(np.diff(c) <= 0):
                raise ValueError("CDF tables: every row must rise strictly from 0 to 2**16 (>= 2 symbols)")

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.cdfs]

    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cdf rows zero-padded to the longest, lengths, offsets) as int32 arrays."""
        width = max(self.lengths)
        out = np.zeros((len(self.cdfs), width), dtype=np.int32)
        for i, c in enumerate(self.cdfs):
            out[i, : len(c)] = c
        return out, np.asarray(self.lengths, dtype=np.int32), np.asarray(self.offsets, dtype=np.int32)


def _check_indexes(indexes: np.ndarray, tables: CdfTables) -> int:
    """Returns the largest index used, after checking that every index names a table."""
    if indexes.size == 0:
        return -1
    lo, hi = int(indexes.min()), int(indexes.max())
    if lo < 0 or hi >= len(tables.cdfs):
        raise ValueError(f"CDF index out of range [0, {len(tables.cdfs)}): {lo}..{hi}")
    return hi


class Encoder:
    """Collects symbols group by group, then writes one rANS string."""

    def __init__(self) -> None:
        self._symbols: list[np.ndarray] = []
        self._indexes: list[np.ndarray] = []
        self._tables: CdfTables | None = None
        self._top = 0  # one past the largest index seen: the coder only gets the rows it needs
        self.count = 0

    def encode(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> None:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
        indexes = np.ascontiguousarray(indexes, dtype=np.int32).reshape(-1)
        if symbols.shape != indexes.shape:
            raise ValueError("symbols and indexes differ in size")
        if self._tables is not None and tables is not self._tables:
            raise ValueError("one string is coded with one set of tables")
        if symbols.size and int(np.abs(symbols).max()) > MAX_ABS_SYMBOL:
            raise ValueError("latent value out of range (not finite, or the model is broken)")
        self._top = max(self._top, _check_indexes(indexes, tables) + 1)
        self._tables = tables
        self._symbols.append(symbols)
        self._indexes.append(indexes)
        self.count += symbols.size

    def flush(self) -> bytes:
        if self._tables is None:
            raise ValueError("nothing to encode")
        pad = max(0, MIN_SYMBOLS - self.count)
        symbols = np.concatenate(self._symbols + [np.zeros(pad, np.int32)])
        indexes = np.concatenate(self._indexes + [np.zeros(pad, np.int32)])
        t, top = self._tables, max(self._top, 1)  # the padding symbols use index 0
        encoder = ans.BufferedRansEncoder()
        encoder.encode_with_indexes(symbols.tolist(), indexes.tolist(), t.cdfs[:top], t.lengths[:top], t.offsets[:top])
        return bytes(encoder.flush())


class Decoder:
    """Decodes one rANS string group by group, in the order the encoder coded it."""

    def __init__(self, string: bytes, tables: CdfTables, total_symbols: int) -> None:
        if len(string) < 8 or len(string) % 4:
            raise StreamError(f"entropy-coded string of {len(string)} bytes: not a whole number of 32-bit words")
        state = int.from_bytes(string[:8], "little")
        if not (1 << 31) <= state < (1 << 63):
            raise StreamError("entropy-coded string does not start with a valid coder state")
        self._tables = tables
        self._remaining = max(total_symbols, MIN_SYMBOLS)
        pad = PAD_BYTES_PER_SYMBOL * self._remaining + _PAD_MIN
        self._decoder = ans.RansDecoder()
        self._decoder.set_stream(bytes(string) + bytes(pad))

    def decode(self, indexes: np.ndarray) -> np.ndarray:
        indexes = np.ascontiguousarray(indexes, dtype=np.int32).reshape(-1)
        if indexes.size > self._remaining:
            raise ValueError("asked to decode more symbols than the stream was opened for")
        self._remaining -= indexes.size
        top = _check_indexes(indexes, self._tables) + 1
        if top == 0:
            return np.zeros(0, dtype=np.int32)
        t = self._tables
        out = self._decoder.decode_stream(indexes.tolist(), t.cdfs[:top], t.lengths[:top], t.offsets[:top])
        symbols = np.fromiter(out, dtype=np.int32, count=indexes.size)
        if symbols.min() < -MAX_ABS_SYMBOL or symbols.max() > MAX_ABS_SYMBOL:
            raise StreamError("entropy-coded string is corrupt (decoded an impossible value)")
        return symbols
