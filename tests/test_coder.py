"""The rANS coder: the native coder against CompressAI's (the oracle), byte for byte both ways;
golden strings; forged, truncated and random strings give StreamError and never crash.

Checks that could crash the process (CompressAI's decoder on forged strings, and ours, to
prove it does not) run in a child process, so a crash fails the test instead of pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from osdiff.runtime import coder as coder_module
from osdiff.runtime.coder import (
    CODERS,
    MAX_ABS_SYMBOL,
    MIN_SYMBOLS,
    CdfTables,
    Decoder,
    Encoder,
    StreamError,
    ans,
    native,
    quantized_cdf,
    use_coder,
)
from osdiff.runtime.entropy import GaussianConditional


@pytest.fixture(scope="module")
def gaussian():
    return GaussianConditional()


@pytest.fixture(scope="module")
def symbols(tiny_dir):
    return dict(np.load(tiny_dir / "symbols.npz"))


@pytest.fixture(params=CODERS)
def coder(request):
    """Each test runs once per coder, selected the way the CLI selects it."""
    before = coder_module.current_coder()
    use_coder(request.param)
    yield request.param
    use_coder(before)


def encode(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables, coder: str) -> bytes:
    enc = Encoder(coder)
    enc.encode(symbols, indexes, tables)
    return enc.flush()


def decode_in_rounds(string: bytes, indexes: np.ndarray, tables: CdfTables, coder: str, rounds: int = 3) -> np.ndarray:
    dec = Decoder(string, tables, indexes.size, coder)
    return np.concatenate([dec.decode(part) for part in np.array_split(indexes, rounds)] + [np.zeros(0, np.int32)])


# ---------------------------------------------------------------------------------------------
# Golden strings of the original implementation
# ---------------------------------------------------------------------------------------------


def test_y_string_is_byte_exact_and_decodes_round_by_round(gaussian, symbols, tiny_dir, coder):
    enc = Encoder()
    enc.encode(symbols["y_symbols_coding_order"], symbols["y_indexes_coding_order"], gaussian.tables)
    reference = (tiny_dir / "y_string.bin").read_bytes()
    assert enc.flush() == reference
    dec = Decoder(reference, gaussian.tables, total_symbols=1536)
    out = []
    for k in range(3):
        for half in ("anchor", "nonanchor"):
            idx = symbols[f"slice{k}_{half}_indexes"]
            got = dec.decode(idx.reshape(-1))
            np.testing.assert_array_equal(got, symbols[f"slice{k}_{half}_symbols"].reshape(-1))
            out.append(got)
    np.testing.assert_array_equal(np.concatenate(out), symbols["y_symbols_coding_order"])


def test_z_string_is_byte_exact(tiny_model, golden, tiny_dir, symbols, coder):
    eb = tiny_model.entropy_bottleneck
    string = eb.compress(golden["lfgcm_z"])[0]
    assert string == (tiny_dir / "z_string.bin").read_bytes()
    z_hat, z_symbols = eb.decompress(string, (2, 3))
    assert torch.equal(z_hat, golden["lfgcm_z_hat"])
    np.testing.assert_array_equal(z_symbols[0], symbols["z_symbols"])


# ---------------------------------------------------------------------------------------------
# The compatibility matrix: native and CompressAI write the same bytes and read each other's
# ---------------------------------------------------------------------------------------------


def random_tables(rng: np.random.Generator, rows: int) -> CdfTables:
    """Rows of 2 to 2000 symbols (the last one the escape), shaped every way a pmf can be."""
    cdfs, offsets = [], []
    for r in range(rows):
        n = int(np.exp(rng.uniform(0, np.log(1999)))) if r else 1999  # pmf entries; the row has n + 1 symbols
        kind = r % 4
        if kind == 0:  # a Gaussian-like bump
            x = np.arange(n) - rng.uniform(0, n)
            pmf = np.exp(-0.5 * (x / rng.uniform(0.3, n / 2 + 1)) ** 2)
        elif kind == 1:  # uniform noise, some zeros (the quantizer still gives them frequency 1)
            pmf = rng.random(n) * (rng.random(n) < 0.7)
        elif kind == 2:  # nearly all mass on one symbol
            pmf = np.full(n, 1e-9)
            pmf[rng.integers(0, n)] = 1.0
        else:  # heavy tail
            pmf = 1.0 / (1 + np.arange(n)) ** rng.uniform(0.5, 3)
        pmf = np.append(pmf, rng.uniform(0, 0.05))  # the tail mass: the escape's share
        if pmf[:-1].sum() == 0:
            pmf[0] = 1.0
        cdf = quantized_cdf(pmf)
        cdfs.append(cdf.tolist())
        offsets.append(int(rng.integers(-n - 3, 4)))
    return CdfTables(cdfs=cdfs, offsets=offsets)


def random_symbols(rng: np.random.Generator, tables: CdfTables, n: int, limit: int = MAX_ABS_SYMBOL) -> tuple[np.ndarray, np.ndarray]:
    """Symbols inside each row's support, at its edges, just outside and far outside in both
    directions, and runs of escapes."""
    lengths = np.asarray(tables.lengths) - 2  # the escape's value; values 0..max-1 are coded directly
    offsets = np.asarray(tables.offsets)
    idx = rng.integers(0, len(tables.cdfs), n).astype(np.int32)
    top = lengths[idx]
    kind = rng.integers(0, 8, n)
    value = rng.integers(0, np.maximum(top, 1))  # inside
    value = np.where(kind == 1, top, value)  # the escape's own value (raw value 0)
    value = np.where(kind == 2, -1, value)  # just below
    value = np.where(kind == 3, top + rng.integers(1, 300, n), value)  # just above
    value = np.where(kind == 4, -rng.integers(1, 300, n), value)
    far = rng.integers(1, limit // 2, n)
    value = np.where(kind == 5, far, value)
    value = np.where(kind == 6, -far, value)
    if n >= 50:  # a long run of escapes
        a = int(rng.integers(0, n - n // 10))
        value[a : a + n // 10] = np.where(rng.random(n // 10) < 0.5, -far[: n // 10], top[a : a + n // 10] + far[: n // 10])
    sym = np.clip(value + offsets[idx], -limit, limit).astype(np.int32)
    return sym, idx


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (3, 2), (7, 3), (100, 4), (1000, 5), (20_000, 6), (20_000, 7)])
def test_native_and_compressai_write_and_read_the_same_bytes(n, seed):
    rng = np.random.default_rng(seed)
    tables = random_tables(rng, int(rng.integers(1, 40)))
    sym, idx = random_symbols(rng, tables, n)
    ours, theirs = encode(sym, idx, tables, "native"), encode(sym, idx, tables, "compressai")
    assert ours == theirs
    for reader in CODERS:
        np.testing.assert_array_equal(decode_in_rounds(ours, idx, tables, reader, rounds=1 + seed % 4), sym)


@pytest.mark.slow
def test_a_million_symbols_both_ways():
    rng = np.random.default_rng(10)
    tables = random_tables(rng, 64)
    sym, idx = random_symbols(rng, tables, 1_000_000)
    ours, theirs = encode(sym, idx, tables, "native"), encode(sym, idx, tables, "compressai")
    assert ours == theirs
    for reader in CODERS:
        np.testing.assert_array_equal(decode_in_rounds(ours, idx, tables, reader, rounds=20), sym)


def test_raw_coders_agree_far_beyond_the_engine_symbol_limit():
    """Past the Python layer's |symbol| <= 2**20, straight through both extensions, as far as
    CompressAI can go: raw escape values below 2**28 (from 2**28 on, its encoder's chunk count
    loop shifts an int32 by 32 and never ends)."""
    rng = np.random.default_rng(11)
    tables = random_tables(rng, 8)
    limit = (1 << 27) - (1 << 12)
    sym, idx = random_symbols(rng, tables, 5000, limit=limit)
    sym[:4] = [limit, -limit, 0, 1]
    cai = ans.BufferedRansEncoder()
    cai.encode_with_indexes(sym.tolist(), idx.tolist(), tables.cdfs, tables.lengths, tables.offsets)
    theirs = bytes(cai.flush())
    ours = native().encode([sym], [idx], tables.native, 1 << 30)
    assert ours == theirs
    np.testing.assert_array_equal(native().Decoder(ours, 1 << 31).decode(idx, tables.native), sym)
    dec = ans.RansDecoder()
    np.testing.assert_array_equal(dec.decode_with_indexes(ours, idx.tolist(), tables.cdfs, tables.lengths, tables.offsets), sym)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_index_arrays_of_any_integer_type(gaussian, dtype, coder):
    rng = np.random.default_rng(12)
    idx = rng.integers(0, 64, 500).astype(dtype)
    sym = rng.integers(-40, 40, 500).astype(np.int32)
    string = encode(sym, idx, gaussian.tables, coder)
    assert string == encode(sym, idx.astype(np.int32), gaussian.tables, "native")
    np.testing.assert_array_equal(Decoder(string, gaussian.tables, 500).decode(idx.reshape(20, 25)), sym)


# ---------------------------------------------------------------------------------------------
# The API's edges, both coders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5])
def test_tiny_symbol_counts_round_trip(gaussian, n, coder):
    """compressai's encoder overflows its buffer below 3 symbols: both coders pad alike."""
    rng = np.random.default_rng(n)
    sym = rng.integers(-3, 4, n).astype(np.int32)
    idx = rng.integers(0, 64, n).astype(np.int32)
    string = encode(sym, idx, gaussian.tables, coder)
    assert len(string) >= 8 and len(string) % 4 == 0
    assert string == encode(sym, idx, gaussian.tables, "compressai")
    np.testing.assert_array_equal(Decoder(string, gaussian.tables, n).decode(idx), sym)
    assert MIN_SYMBOLS == 3


def test_escape_codes_round_trip(gaussian, coder):
    """Values far outside the CDF support take the bypass path both ways."""
    sym = np.array([0, 5000, -70000, 3, (1 << 20), -(1 << 20), 1], dtype=np.int32)
    idx = np.array([0, 0, 10, 63, 0, 5, 0], dtype=np.int32)
    np.testing.assert_array_equal(Decoder(encode(sym, idx, gaussian.tables, coder), gaussian.tables, 7).decode(idx), sym)


def test_encoder_refuses_bad_arguments(gaussian, coder):
    """Sizes are checked per group, values once for the whole string when it is written."""
    bad_values = [
        (np.zeros(4, np.int32), np.array([0, 1, 64, 2], np.int32)),
        (np.zeros(4, np.int32), np.array([0, -1, 3, 2], np.int32)),
        (np.array([0, (1 << 20) + 1], np.int32), np.zeros(2, np.int32)),
        (np.array([-(1 << 20) - 1, 0], np.int32), np.zeros(2, np.int32)),
    ]
    for symbols, indexes in bad_values:
        enc = Encoder(coder)
        enc.encode(np.zeros(5, np.int32), np.zeros(5, np.int32), gaussian.tables)  # a good group first
        enc.encode(symbols, indexes, gaussian.tables)
        with pytest.raises(ValueError, match="out of range"):
            enc.flush()
    enc = Encoder(coder)
    with pytest.raises(ValueError, match="differ in size"):
        enc.encode(np.zeros(3, np.int32), np.zeros(4, np.int32), gaussian.tables)
    # what a cast to int32 would change is refused, never wrapped or truncated into range
    with pytest.raises(ValueError, match="symbols out of range"):
        enc.encode(np.array([0, (1 << 32) + 5]), np.zeros(2, np.int32), gaussian.tables)
    with pytest.raises(ValueError, match="CDF indexes out of range"):
        enc.encode(np.zeros(2, np.int32), np.array([0, 1 << 32]), gaussian.tables)
    with pytest.raises(TypeError, match="must be integers"):
        enc.encode(np.array([0.0, 1.7]), np.zeros(2, np.int32), gaussian.tables)
    with pytest.raises(TypeError, match="must be integers"):
        enc.encode(np.zeros(2, np.int32), np.array([0.0, 1.7]), gaussian.tables)
    with pytest.raises(ValueError, match="nothing to encode"):
        enc.flush()


def test_decoder_refuses_bad_indexes_and_too_many_symbols(gaussian, coder):
    string = encode(np.zeros(10, np.int32), np.zeros(10, np.int32), gaussian.tables, coder)
    with pytest.raises(ValueError, match="out of range|outside the tables"):
        Decoder(string, gaussian.tables, 10).decode(np.array([0, 64], np.int32))
    dec = Decoder(string, gaussian.tables, 10)
    with pytest.raises(TypeError):  # refused for its arguments: decodes nothing, counts nothing
        dec.decode(np.zeros(6, np.float32))
    dec.decode(np.zeros(6, np.int32))
    with pytest.raises(ValueError, match="more symbols"):
        dec.decode(np.zeros(5, np.int32))
    np.testing.assert_array_equal(dec.decode(np.zeros(4, np.int32)), np.zeros(4, np.int32))


def test_native_tables_and_coder_refuse_what_would_read_out_of_bounds(gaussian):
    """The extension checks its own arguments: it does not rely on the Python layer."""
    n = native()
    cdf, lengths, offsets = gaussian.tables.padded()
    for bad_lengths in ([2] + [5] * 63, [cdf.shape[1] + 1] + [5] * 63):
        with pytest.raises(ValueError, match="bad length"):
            n.Tables(cdf, np.array(bad_lengths, np.int32), offsets)
    broken = cdf.copy()
    broken[3, 2] = broken[3, 1]
    with pytest.raises(ValueError, match="strictly increasing"):
        n.Tables(broken, lengths, offsets)
    with pytest.raises(ValueError, match="one length and one offset"):
        n.Tables(cdf, lengths[:-1], offsets)
    zeros = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="CDF index 64 out of range"):
        n.encode([zeros, zeros], [zeros, np.array([0, 64, 0], np.int32)], gaussian.tables.native, 10)
    with pytest.raises(ValueError, match="latent value out of range"):
        n.encode([zeros, np.array([0, 11, 0], np.int32)], [zeros, zeros], gaussian.tables.native, 10)
    with pytest.raises(ValueError, match="differ in size"):
        n.encode([zeros], [np.zeros(2, np.int32)], gaussian.tables.native, 10)
    with pytest.raises(ValueError, match="one index array per symbol array"):
        n.encode([zeros, zeros], [zeros], gaussian.tables.native, 10)
    string = n.encode([zeros], [zeros], gaussian.tables.native, 10)
    with pytest.raises(ValueError, match="outside the tables"):
        n.Decoder(string, 100).decode(np.array([-1], np.int32), gaussian.tables.native)
    # no implicit casts, which would wrap values into range
    for symbols, indexes in [(np.array([0, 1, 1 << 40]), np.zeros(3, np.int32)),
                             (np.zeros(3, np.int32), np.array([0, 300, 1])),
                             (np.zeros(6, np.int32)[::2], np.zeros(3, np.int32))]:
        with pytest.raises(TypeError):
            n.encode([symbols], [indexes], gaussian.tables.native, 1 << 20)
    with pytest.raises(TypeError):  # one index type for all groups
        n.encode([zeros, zeros], [zeros, zeros.astype(np.uint8)], gaussian.tables.native, 10)
    with pytest.raises(TypeError):
        n.Decoder(string, 100).decode(np.array([0, 300]), gaussian.tables.native)
    with pytest.raises(TypeError):
        n.ScaleIndex(gaussian.scale_table.numpy())(np.ones(3))  # float64
    for table in ([-3.0, -2.0, -1.0, 1.0], [0.0, 1.0, 2.0], [1.0, 1.0, 2.0], [1.0, np.inf]):
        with pytest.raises(ValueError, match="scale table"):
            n.ScaleIndex(np.array(table, np.float32))


@pytest.mark.parametrize("string", [b"", b"\x00" * 7, b"\x00" * 9, b"\xff" * 12, b"\x00" * 16])
def test_decoder_refuses_strings_the_encoder_never_writes(gaussian, string, coder):
    with pytest.raises(StreamError):
        Decoder(string, gaussian.tables, 100)


def test_decoder_refuses_strings_longer_than_the_symbols_allow(gaussian, coder):
    string = (1 << 62).to_bytes(8, "little") + bytes(8 * 100 + 12)  # one word over 8 * 100 + 16
    with pytest.raises(StreamError, match="longer than any encoder writes"):
        Decoder(string, gaussian.tables, 100)


def test_coder_selection():
    assert coder_module.current_coder() == "native"
    with pytest.raises(ValueError, match="unknown coder"):
        use_coder("fast")
    with pytest.raises(ValueError, match="unknown coder"):
        Encoder("fast")


# ---------------------------------------------------------------------------------------------
# Corrupt strings: StreamError or symbols, never a crash, never a read outside the string
# ---------------------------------------------------------------------------------------------


def test_truncated_strings_raise_stream_error(gaussian, coder):
    rng = np.random.default_rng(13)
    idx = rng.integers(0, 64, 3000).astype(np.uint8)
    sym = np.round(rng.normal(0, gaussian.scale_table.numpy()[idx])).astype(np.int32)
    string = encode(sym, idx, gaussian.tables, coder)
    for cut in sorted({8, 12, *rng.integers(8, len(string), 40).tolist(), len(string) - 4}):
        short = string[: cut - cut % 4]
        try:
            out = decode_in_rounds(short, idx, gaussian.tables, coder)
        except StreamError:
            continue
        # the native coder reads exactly the encoder's words: a cut string cannot decode
        assert coder == "compressai", f"native decoded a string cut to {len(short)} of {len(string)} bytes"
        assert not np.array_equal(out, sym)


def test_garbage_strings_raise_stream_error_or_decode(gaussian, coder):
    """Random words with a valid initial state, some all-ones (the longest escape chains)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 64, 20_000).astype(np.int32)
    errors = 0
    for trial in range(200):
        n_words = int(rng.integers(2, 64))
        words = rng.integers(0, 1 << 32, n_words, dtype=np.uint64).astype("<u4")
        words[1] = (words[1] & 0x7FFFFFFF) | 1  # initial state in [2^32, 2^63)
        if trial % 3 == 0:
            words[2:] = 0xFFFFFFFF
        try:
            decode_in_rounds(words.tobytes(), idx, gaussian.tables, coder, rounds=4)
        except StreamError:
            errors += 1
    assert errors > 0


def run_isolated(code: str, timeout: float = 300) -> str:
    """Runs code in a fresh interpreter; a crash or a hang fails the test, not pytest."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"child exited {out.returncode} (negative: killed by signal)\n{out.stderr[-3000:]}"
    return out.stdout


FORGED = """
    import sys, time
    import numpy as np
    from osdiff.runtime.coder import Decoder, StreamError
    from osdiff.runtime.entropy import GaussianConditional

    tables = GaussianConditional().tables
    coder = sys.argv[1] if len(sys.argv) > 1 else "{coder}"
    for size in {sizes}:
        for state in (1 << 31, (1 << 63) - 1, 0x5DEECE66D1234567):
            string = state.to_bytes(8, "little") + b"\\xff" * size
            for symbols in (1000, len(string) // 8):  # the second passes the length check
                idx = np.zeros(symbols, np.uint8)  # the narrowest table: its escape is likeliest
                t0 = time.perf_counter()
                try:
                    dec = Decoder(string, tables, symbols, coder)
                    for part in np.array_split(idx, 4):
                        dec.decode(part)
                    outcome = "decoded"
                except StreamError as e:
                    outcome = "StreamError: " + str(e)
                print(size, hex(state), symbols, f"{{time.perf_counter() - t0:.2f}}s", outcome)
"""


@pytest.mark.parametrize("which", CODERS)
def test_forged_escape_chains_cannot_crash_the_decoder(which):
    """The issue's crash: a valid state followed by 4 KiB .. 8 MiB of 0xFF (CompressAI's
    decoder ran off its padding and died with SIGSEGV at 1 MiB)."""
    sizes = [4 << 10, 64 << 10, 1 << 20, 8 << 20]
    out = run_isolated(FORGED.format(coder=which, sizes=sizes))
    lines = out.strip().splitlines()
    assert len(lines) == len(sizes) * 3 * 2, out
    if which == "native":
        # The count of escape chunks is bounded: a chain is refused where it starts. (With few
        # symbols of the narrowest table a state can last without reading the chain at all.)
        for line in lines:
            size, _, symbols, seconds, outcome = line.split(maxsplit=4)
            assert float(seconds[:-1]) < 1.0, line
            assert outcome.startswith("StreamError") or (outcome == "decoded" and int(symbols) <= 1000), line
    else:
        # CompressAI's decoder may turn a chain into plausible values (then the stream's check
        # value rejects the image); what matters here is that the child survived every case
        assert all(("StreamError" in line) or line.endswith("decoded") for line in lines), out


def test_forged_stream_through_the_codec_gives_a_stream_error(tiny_model, coder):
    """The issue's recipe end to end: a valid .osd with its y string replaced."""
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.bitstream import OsdStream
    from osdiff.runtime.codec import Codec

    codec = Codec(TorchBackend(tiny_model), max_pixels=256 * 256)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    stream = OsdStream.from_bytes(codec.compress(image))
    for size in (4 << 10, 1 << 20):
        stream.y_string = ((1 << 63) - 1).to_bytes(8, "little") + b"\xff" * size
        with pytest.raises(StreamError):
            codec.decompress(stream.to_bytes())


def test_decoding_releases_the_gil(gaussian):
    """A Python thread runs while the native decoder works (with a switch interval so long that
    it could not run otherwise)."""
    rng = np.random.default_rng(14)
    idx = rng.integers(0, 64, 400_000).astype(np.uint8)
    sym = np.round(rng.normal(0, gaussian.scale_table.numpy()[idx])).astype(np.int32)
    string = encode(sym, idx, gaussian.tables, "native")
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0)  # gives the GIL back at once

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    thread = threading.Thread(target=spin)
    try:
        thread.start()
        time.sleep(0.01)
        before = ticks[0]
        out = Decoder(string, gaussian.tables, idx.size, "native").decode(idx)
        during = ticks[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        thread.join()
    np.testing.assert_array_equal(out, sym)
    assert during > 0


def test_one_native_decoder_used_by_two_threads_takes_turns(gaussian):
    """Decoding releases the GIL, so two threads can be inside one decoder: they take turns
    (a lock in the decoder), each getting a whole run of consecutive symbols."""
    rng = np.random.default_rng(16)
    half = rng.integers(0, 64, 2_000_000).astype(np.uint8)
    idx = np.concatenate([half, half])  # both threads decode with the same indexes
    sym = np.round(rng.normal(0, gaussian.scale_table.numpy()[idx])).astype(np.int32)
    dec = native().Decoder(encode(sym, idx, gaussian.tables, "native"), MAX_ABS_SYMBOL)
    out: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: out.append(dec.decode(half, gaussian.tables.native))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2
    first, second = sorted(out, key=lambda a: not np.array_equal(a, sym[: half.size]))
    np.testing.assert_array_equal(first, sym[: half.size])
    np.testing.assert_array_equal(second, sym[half.size :])
