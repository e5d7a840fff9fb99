"""The one door to the rANS range coder: CompressAI's stream format (`compressai.ans`), written
by either of two coders that produce and read the same bytes.

- "native" (the default): ours, `osdiff.runtime._rans`, built from runtime/native/ by
  CMakeLists.txt. numpy arrays in and out, tables registered once per model, one call per
  decoding round with the GIL released, and every read of a string bounds-checked: any bytes
  decode to symbols or raise StreamError, in time linear in (string length + symbols).
- "compressai": CompressAI's own C++ coder (BufferedRansEncoder, RansDecoder), kept as the
  oracle the native coder is tested against and selectable at run time
  (`use_coder("compressai")`, `osdiff ... --coder compressai`). It takes Python lists, and it
  trusts its caller completely, so this module never calls it with arguments that can hurt it:
  - encoding fewer than 3 symbols overflows its output buffer (it reserves one 32-bit word
    per symbol; the flush alone writes two): every string codes at least MIN_SYMBOLS (the
    native coder pads the same way, so the two write the same bytes);
  - indexes outside the table list, or tables that are not strictly increasing 16-bit CDFs,
    are read out of bounds: both are validated here;
  - its decoder does no bounds checks: it is given a copy of the string followed by enough
    zero bytes to hold every read any string of that length can cause (compressai_padding).

We do not import CompressAI's Python package: its `__init__` imports the whole training stack
(torchvision, torch-geometric, matplotlib, ...), which is slow and on CPU-only torch builds
does not import at all. Its two C++ pieces we use (the coder and the pmf -> 16-bit CDF
quantizer) are self-contained pybind11 modules, loaded straight from the installed
distribution.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType

import numpy as np

PRECISION = 16
MIN_SYMBOLS = 3
# |symbol| beyond this means the latent is not finite or the stream is garbage; a trained
# OSDiff latent is within a few hundred.
MAX_ABS_SYMBOL = 1 << 20
# The most a symbol of |value| <= MAX_ABS_SYMBOL can cost: 16 bits (frequency >= 1 of 2^16),
# plus an escape's 4-bit chunk count and at most six 4-bit chunks of its raw value (< 2^24
# for the tables any model has). Rounded up to 8 bytes: a longer string for n symbols was not
# written by an encoder.
MAX_BYTES_PER_SYMBOL = 8
CODERS = ("native", "compressai")
_coder = "native"


class StreamError(ValueError):
    """The bitstream is corrupt, truncated, or was not made by this model."""


def use_coder(name: str) -> None:
    """Selects the coder that Encoder and Decoder use from now on: "native" or "compressai".
    Streams do not depend on it: each coder reads the other's strings."""
    global _coder
    if name not in CODERS:
        raise ValueError(f"unknown coder {name!r}; choose one of {', '.join(CODERS)}")
    if name == "native":
        native()  # fail here, not at the first image, if it is not built
    _coder = name


def current_coder() -> str:
    return _coder


def _load_extension(full_name: str, path: str) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(full_name, path)
    spec = importlib.util.spec_from_file_location(full_name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[full_name] = module
    return module


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
                return _load_extension(full, path)
    raise ImportError(f"compressai is installed but its C++ extension {name!r} is missing")


ans = _compressai_extension("ans")


def native() -> ModuleType:
    """The native extension, osdiff.runtime._rans. OSDIFF_NATIVE_CODER=PATH loads another build
    of it instead (`make sanitize` uses this for its AddressSanitizer build)."""
    name = "osdiff.runtime._rans"
    if name in sys.modules:
        return sys.modules[name]
    path = os.environ.get("OSDIFF_NATIVE_CODER")
    if path:
        return _load_extension(name, path)
    try:
        from osdiff.runtime import _rans
    except ImportError as e:
        raise ImportError(
            "the native entropy-coding extension (osdiff.runtime._rans) is not built: reinstall the package "
            "(`pip install -e .`, needs a C++17 compiler)"
        ) from e
    return _rans


def quantized_cdf(pmf: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """CompressAI's pmf -> quantized CDF (every symbol keeps a frequency >= 1)."""
    pmf = np.asarray(pmf, dtype=np.float32)
    if pmf.ndim != 1 or pmf.size < 2 or not np.all(np.isfinite(pmf)) or np.any(pmf < 0) or pmf.sum() <= 0:
        raise ValueError("cannot build a CDF from a pmf that is not finite, non-negative and non-zero")
    cdf = _compressai_extension("_CXX").pmf_to_quantized_cdf(pmf.tolist(), precision)
    return np.asarray(cdf, dtype=np.int32)


@dataclass(frozen=True)
class CdfTables:
    """A list of quantized CDFs in the form the coders take.

    `cdfs[i]` is truncated to its length: the compressai coder converts every row it is given
    from Python on every call, so padded rows (3133 entries each for the Gaussian tables) would
    cost more than the decoding itself. The native coder gets them once, as `native`.
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

    @cached_property
    def native(self) -> object:
        """The tables registered with the native coder (built on first use, then kept)."""
        return native().Tables(*self.padded())


def _int32_array(values: np.ndarray, what: str) -> np.ndarray:
    """A flat int32 array of integers, refusing what a cast would change (floats, values beyond
    int32) instead of wrapping or truncating them into range."""
    values = np.asarray(values).reshape(-1)
    if values.dtype == np.int32:
        return np.ascontiguousarray(values)
    if values.dtype.kind not in "iu" and values.size:
        raise TypeError(f"{what} must be integers, not {values.dtype}")
    if values.size and (int(values.min()) < -(1 << 31) or int(values.max()) >= 1 << 31):
        raise ValueError(f"{what} out of range: beyond 32-bit integers")
    return values.astype(np.int32)


def _index_array(indexes: np.ndarray) -> np.ndarray:
    """A flat index array in a type both coders take without another copy where possible."""
    indexes = np.asarray(indexes).reshape(-1)
    if indexes.dtype in (np.uint8, np.uint16):
        return np.ascontiguousarray(indexes)
    return _int32_array(indexes, "CDF indexes")


def _check_indexes(indexes: np.ndarray, tables: CdfTables) -> int:
    """Returns the largest index used, after checking that every index names a table."""
    if indexes.size == 0:
        return -1
    lo, hi = int(indexes.min()), int(indexes.max())
    if lo < 0 or hi >= len(tables.cdfs):
        raise ValueError(f"CDF index out of range [0, {len(tables.cdfs)}): {lo}..{hi}")
    return hi


class Encoder:
    """Collects symbols group by group, then writes one rANS string (rANS codes in reverse, so
    nothing is written before the last group is known). Groups are held, not copied, until
    flush(): callers must not change the arrays they gave."""

    def __init__(self, coder: str | None = None) -> None:
        self.coder = coder or _coder
        if self.coder not in CODERS:
            raise ValueError(f"unknown coder {self.coder!r}")
        self._symbols: list[np.ndarray] = []
        self._indexes: list[np.ndarray] = []
        self._tables: CdfTables | None = None
        self.count = 0

    def encode(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> None:
        """symbols: any integer shape; indexes: CDF rows, the same number in the same order.
        Values are checked once for the whole string, by flush()."""
        symbols = _int32_array(symbols, "symbols")
        indexes = _index_array(indexes)
        if symbols.shape != indexes.shape:
            raise ValueError("symbols and indexes differ in size")
        if self._tables is not None and tables is not self._tables:
            raise ValueError("one string is coded with one set of tables")
        self._tables = tables
        self._symbols.append(symbols)
        self._indexes.append(indexes)
        self.count += symbols.size

    def flush(self) -> bytes:
        """The string of everything encoded. Raises ValueError for a symbol beyond
        MAX_ABS_SYMBOL (a latent that is not finite, or a broken model) or an index outside the
        tables."""
        if self._tables is None:
            raise ValueError("nothing to encode")
        t, pad = self._tables, max(0, MIN_SYMBOLS - self.count)
        indexes = self._indexes
        if len({i.dtype for i in indexes}) > 1:
            indexes = [i.astype(np.int32) for i in indexes]
        symbols = self._symbols + [np.zeros(pad, np.int32)]
        indexes = indexes + [np.zeros(pad, indexes[0].dtype)]  # padding: index 0
        if self.coder == "native":
            # the groups as they are (no concatenation), values checked while coding
            return native().encode(symbols, indexes, t.native, MAX_ABS_SYMBOL)
        all_symbols, all_indexes = np.concatenate(symbols), np.concatenate(indexes)
        if int(all_symbols.min()) < -MAX_ABS_SYMBOL or int(all_symbols.max()) > MAX_ABS_SYMBOL:
            raise ValueError("latent value out of range (not finite, or the model is broken)")
        top = _check_indexes(all_indexes, t) + 1  # the compressai coder only gets the rows it needs
        encoder = ans.BufferedRansEncoder()
        encoder.encode_with_indexes(all_symbols.tolist(), all_indexes.tolist(), t.cdfs[:top], t.lengths[:top],
                                    t.offsets[:top])
        return bytes(encoder.flush())


def compressai_padding(string_bytes: int, symbols: int) -> int:
    """Zero bytes behind a string that hold every read CompressAI's decoder can make on it.

    Past the data, its reads come from escape codes: a chunk count is a run of 15s (4 bits
    each) and sets how many 4-bit raw chunks follow. Over the string's own bytes a run can read
    15 chunks of raw value per count chunk: at most 15 bytes per byte of string. In the zeros
    behind it, a count run only lasts as long as the 64-bit state still holds string bits (at
    most 16 chunks), so one symbol reads at most 16 + 4 * (1 + 16 + 16 * 15) bits plus one
    refill word: under 160 bytes.
    """
    return 16 * string_bytes + 160 * symbols + (1 << 16)


class Decoder:
    """Decodes one rANS string group by group, in the order the encoder coded it."""

    def __init__(self, string: bytes, tables: CdfTables, total_symbols: int, coder: str | None = None) -> None:
        self.coder = coder or _coder
        if self.coder not in CODERS:
            raise ValueError(f"unknown coder {self.coder!r}")
        self._tables = tables
        self._remaining = max(total_symbols, MIN_SYMBOLS)
        if len(string) > MAX_BYTES_PER_SYMBOL * self._remaining + 16:
            raise StreamError(f"entropy-coded string of {len(string)} bytes: longer than any encoder writes "
                              f"for {self._remaining} symbols")
        if self.coder == "native":
            try:
                self._native = native().Decoder(bytes(string), MAX_ABS_SYMBOL)
            except native().StreamError as e:
                raise StreamError(str(e)) from None
            return
        if len(string) < 8 or len(string) % 4:
            raise StreamError(f"entropy-coded string of {len(string)} bytes is truncated or corrupt: a coded string is "
                              "a whole number of 32-bit words, at least two")
        state = int.from_bytes(string[:8], "little")
        if not (1 << 31) <= state < (1 << 63):
            raise StreamError("entropy-coded string does not start with a valid coder state")
        self._decoder = ans.RansDecoder()
        self._decoder.set_stream(bytes(string) + bytes(compressai_padding(len(string), self._remaining)))

    @property
    def fused(self) -> bool:
        """Whether `dequantize_half` is available (the native coder)."""
        return self.coder == "native"

    def dequantize_half(self, means: np.ndarray, scales: np.ndarray, scale_index: object, anchor: bool,
                        y_hat: np.ndarray) -> np.ndarray:
        """One checkerboard round of y in one native call (runtime/native/checkerboard.hpp): the
        CDF rows of `scales`, the next symbols, and symbols + means written into y_hat's half.

        means, scales: (C, H, W/2) float32; y_hat: (C, H, W) float32, written in place; all
        C-contiguous. Returns the symbols, (C * H * W/2,) int32. Raises StreamError (corrupt
        string), ValueError (wrong shapes); native coder only."""
        if not self.fused:
            raise ValueError("dequantize_half needs the native coder")
        if means.size > self._remaining:
            raise ValueError("asked to decode more symbols than the stream was opened for")
        try:
            symbols = self._native.dequantize_half(self._tables.native, means, scales, scale_index, anchor, y_hat)
        except native().StreamError as e:
            raise StreamError(str(e)) from None
        self._remaining -= means.size  # only now: a call refused for its arguments decoded nothing
        return symbols

    def decode(self, indexes: np.ndarray) -> np.ndarray:
        """indexes: the CDF rows of the next symbols, any shape -> those symbols, (n,) int32."""
        indexes = _index_array(indexes)
        if indexes.size > self._remaining:
            raise ValueError("asked to decode more symbols than the stream was opened for")
        if self.coder == "native":
            try:
                symbols = self._native.decode(indexes, self._tables.native)
            except native().StreamError as e:
                raise StreamError(str(e)) from None
        else:
            top = _check_indexes(indexes, self._tables) + 1
            if top == 0:
                return np.zeros(0, dtype=np.int32)
            t = self._tables
            out = self._decoder.decode_stream(indexes.tolist(), t.cdfs[:top], t.lengths[:top], t.offsets[:top])
            symbols = np.fromiter(out, dtype=np.int32, count=indexes.size)
            if symbols.min() < -MAX_ABS_SYMBOL or symbols.max() > MAX_ABS_SYMBOL:
                raise StreamError("entropy-coded string is corrupt (decoded an impossible value)")
        self._remaining -= indexes.size  # only now: a call refused for its arguments decoded nothing
        return symbols
