"""Entropy coding of y on the CPU: our latent codec against the reference's naive path, side by side.

The full-size LFGCM with seeded random weights codes one image's latent y (491,520 symbols at
512x768). Each repetition encodes and decodes y once with each path, running the 20
entropy-parameter networks once per path on the same inputs, and splits every run into
network time, index/conversion time (scale -> CDF index, symbol <-> tensor conversions,
checkerboard layout) and time inside the rANS coder. "Outside the networks" is the whole y
loop's wall time minus its network time, so work that falls between the traced spans is
counted too (the "other" column).

Three paths: "ours" is our latent codec with the native coder (the default), where each round
outside the networks is one native call (runtime/native/checkerboard.hpp: quantization or
decoding, scale -> index, checkerboard layout): encoding rounds show as index time, the rANS
encoding of the whole image as coder time; decoding rounds, which decode too, as coder time.
"ours+cai" is the same loop with CompressAI's coder (`use_coder("compressai")`; decoding then
takes the tensor path that CUDA runs); "naive" the reference's way.
The coder column divided by the symbols is each coder's time per symbol as the loop sees it
(for CompressAI's coder that includes its bindings' list conversions, which are the price of
calling it).

The naive path is written here the way the reference does it (utils/ckbd.py, model/lfgcm.py
of cheesejiang/OSDiff): the padded 64 x 3133 quantized CDF table converted with tolist() once
per image and passed whole to every coder call, compressai's 63-pass build_indexes, list round
trips of indexes and symbols every round, and checkerboard split/squeeze/unsqueeze by zeros
plus strided assignment. CompressAI's Python package does not import here, so the naive path calls
its C++ coder (BufferedRansEncoder, RansDecoder) through osdiff.runtime.coder.ans.

    python benchmarks/entropy.py [--config full --height 512 --width 768 --repeat 5 --seed 0 --threads 1 --json PATH]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
import numpy as np
import torch
from torch import Tensor

from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.coder import ans, use_coder
from osdiff.runtime.entropy import GaussianConditional
from osdiff.runtime.latent_codec import CodedLatent, compress_latent, decompress_latent
from osdiff.runtime.profiling import Trace

DEFAULT_JSON = Path(__file__).parent / "results" / "entropy_cpu.json"
PARTS = ("total", "network", "index", "coder", "other", "outside")
RATIO_PARTS = ("total", "network", "index", "coder", "outside")  # "other" is a small remainder
PATHS = ("ours", "ours+cai", "naive")
# The target: ours outside the networks <= 1/15 of the naive path's, encode and decode, same run.
TARGET_RATIO = 1 / 15
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The reference's path (utils/ckbd.py and model/lfgcm.py), on our networks and coder binding
# ---------------------------------------------------------------------------------------------


def ckbd_split(y: Tensor) -> tuple[Tensor, Tensor]:
    """Anchors and non-anchors in the full layout, zeros elsewhere."""
    anchor = torch.zeros_like(y).to(y.device)
    anchor[:, :, 0::2, 1::2] = y[:, :, 0::2, 1::2]
    anchor[:, :, 1::2, 0::2] = y[:, :, 1::2, 0::2]
    nonanchor = torch.zeros_like(y).to(y.device)
    nonanchor[:, :, 0::2, 0::2] = y[:, :, 0::2, 0::2]
    nonanchor[:, :, 1::2, 1::2] = y[:, :, 1::2, 1::2]
    return anchor, nonanchor


def ckbd_anchor_squeeze(y: Tensor) -> Tensor:
    b, c, h, w = y.shape
    out = torch.zeros([b, c, h, w // 2]).to(y.device)
    out[:, :, 0::2, :] = y[:, :, 0::2, 1::2]
    out[:, :, 1::2, :] = y[:, :, 1::2, 0::2]
    return out


def ckbd_nonanchor_squeeze(y: Tensor) -> Tensor:
    b, c, h, w = y.shape
    out = torch.zeros([b, c, h, w // 2]).to(y.device)
    out[:, :, 0::2, :] = y[:, :, 0::2, 0::2]
    out[:, :, 1::2, :] = y[:, :, 1::2, 1::2]
    return out


def ckbd_anchor_unsqueeze(s: Tensor) -> Tensor:
    b, c, h, w = s.shape
    out = torch.zeros([b, c, h, w * 2]).to(s.device)
    out[:, :, 0::2, 1::2] = s[:, :, 0::2, :]
    out[:, :, 1::2, 0::2] = s[:, :, 1::2, :]
    return out


def ckbd_nonanchor_unsqueeze(s: Tensor) -> Tensor:
    b, c, h, w = s.shape
    out = torch.zeros([b, c, h, w * 2]).to(s.device)
    out[:, :, 0::2, 0::2] = s[:, :, 0::2, :]
    out[:, :, 1::2, 1::2] = s[:, :, 1::2, :]
    return out


SQUEEZE = {"anchor": ckbd_anchor_squeeze, "nonanchor": ckbd_nonanchor_squeeze}
UNSQUEEZE = {"anchor": ckbd_anchor_unsqueeze, "nonanchor": ckbd_nonanchor_unsqueeze}


class NaiveGaussian:
    """What the reference reads from compressai's GaussianConditional: the padded table buffers
    and the 63-pass build_indexes."""

    def __init__(self, gaussian: GaussianConditional) -> None:
        cdf, lengths, offsets = gaussian.tables.padded()
        self.quantized_cdf = torch.from_numpy(cdf)
        self.cdf_length = torch.from_numpy(lengths)
        self.offset = torch.from_numpy(offsets)
        self.scale_table = gaussian.scale_table
        self.scale_bound = torch.Tensor([float(self.scale_table[0])])

    def table_lists(self) -> tuple[list[list[int]], list[int], list[int]]:
        return (self.quantized_cdf.tolist(), self.cdf_length.reshape(-1).int().tolist(),
                self.offset.reshape(-1).int().tolist())

    def build_indexes(self, scales: Tensor) -> Tensor:
        if self.scale_bound.device != scales.device:  # a buffer of the reference's module: on its device
            self.scale_bound = self.scale_bound.to(scales.device)
        scales = torch.max(scales, self.scale_bound)
        indexes = scales.new_full(scales.size(), len(self.scale_table) - 1).int()
        for s in self.scale_table[:-1]:
            indexes -= (scales <= s).int()
        return indexes


class Rounds:
    """The backend's entropy-parameter graphs as the reference's rounds see them: its heads
    output scales and means in the full layout (ours run the 1x1 heads on the squeezed layout,
    at half the cost), so the outputs are expanded here, inside the network time."""

    def __init__(self, backend: TorchBackend, cfg: ModelConfig, hyper: Tensor) -> None:
        self.backend, self.cfg, self.hyper = backend, cfg, hyper

    def anchor(self, k: int, y_hat_slices: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        out = self.backend.run(f"entropy_anchor_{k}", self.hyper, *([torch.cat(y_hat_slices, 1)] if k else []))
        return ckbd_anchor_unsqueeze(out[0]), ckbd_anchor_unsqueeze(out[1]), (out[2] if k else None)

    def nonanchor(self, k: int, anchor_hat: Tensor, channel_ctx: Tensor | None) -> tuple[Tensor, Tensor]:
        scales, means = self.backend.run(f"entropy_nonanchor_{k}", anchor_hat, self.hyper,
                                         *([channel_ctx] if channel_ctx is not None else []))
        return ckbd_nonanchor_unsqueeze(scales), ckbd_nonanchor_unsqueeze(means)


def naive_compress_y(rounds: Rounds, gc: NaiveGaussian, y: Tensor, trace: Trace) -> bytes:
    with trace("tables.index"):
        cdf, cdf_lengths, offsets = gc.table_lists()
    symbols_list: list[int] = []
    indexes_list: list[int] = []
    y_hat_slices: list[Tensor] = []

    def code(k: int, half: str, values: Tensor, scales: Tensor, means: Tensor) -> Tensor:
        with trace(f"slice{k}.{half}.index"):
            squeeze = SQUEEZE[half]
            values, scales, means = squeeze(values), squeeze(scales), squeeze(means)
            indexes = gc.build_indexes(scales)
            symbols = torch.round(values - means).int()
            symbols_list.extend(symbols.reshape(-1).tolist())
            indexes_list.extend(indexes.reshape(-1).tolist())
            return UNSQUEEZE[half](symbols + means)

    for k, (lo, hi) in enumerate(rounds.cfg.lfgcm.slice_ranges):
        with trace(f"slice{k}.anchor.index"):
            anchor, nonanchor = ckbd_split(y[:, lo:hi])
        with trace(f"slice{k}.anchor.network"):
            scales, means, channel_ctx = rounds.anchor(k, y_hat_slices)
        anchor_hat = code(k, "anchor", anchor, scales, means)
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = rounds.nonanchor(k, anchor_hat, channel_ctx)
        y_hat_slices.append(anchor_hat + code(k, "nonanchor", nonanchor, scales, means))
    with trace("y_coding"):
        encoder = ans.BufferedRansEncoder()
        encoder.encode_with_indexes(symbols_list, indexes_list, cdf, cdf_lengths, offsets)
        return bytes(encoder.flush())


def naive_decompress_y(rounds: Rounds, gc: NaiveGaussian, y_string: bytes, trace: Trace) -> tuple[Tensor, list[list[int]]]:
    """-> (y_hat, the decoded symbols of every round)."""
    with trace("tables.index"):
        cdf, cdf_lengths, offsets = gc.table_lists()
    with trace("set_stream.coder"):
        decoder = ans.RansDecoder()
        decoder.set_stream(y_string)
    decoded: list[list[int]] = []
    y_hat_slices: list[Tensor] = []

    def decode(k: int, half: str, scales: Tensor, means: Tensor) -> Tensor:
        with trace(f"slice{k}.{half}.index"):
            squeeze = SQUEEZE[half]
            scales, means = squeeze(scales), squeeze(means)
            indexes = gc.build_indexes(scales).reshape(-1).tolist()
        with trace(f"slice{k}.{half}.coder"):
            values = decoder.decode_stream(indexes, cdf, cdf_lengths, offsets)
        with trace(f"slice{k}.{half}.index"):
            decoded.append(values)
            return UNSQUEEZE[half](torch.Tensor(values).reshape(scales.shape).to(means.device) + means)

    for k in range(len(rounds.cfg.lfgcm.slice_ch)):
        with trace(f"slice{k}.anchor.network"):
            scales, means, channel_ctx = rounds.anchor(k, y_hat_slices)
        anchor_hat = decode(k, "anchor", scales, means)
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = rounds.nonanchor(k, anchor_hat, channel_ctx)
        y_hat_slices.append(anchor_hat + decode(k, "nonanchor", scales, means))
    return torch.cat(y_hat_slices, 1), decoded


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def split(trace: Trace, wall_ms: float, not_y: tuple[str, ...] = ()) -> dict[str, float]:
    """Milliseconds per part of the y loop. Span names end in .network/.index/.coder; the
    spans named in `not_y` (z coding, hyper synthesis) are reported on their own and taken out
    of the wall time."""
    parts = {"network": 0.0, "index": 0.0, "coder": 0.0}
    apart = {name: 0.0 for name in not_y}
    for s in trace.spans():
        if s.name in apart:
            apart[s.name] += s.duration_ms
        else:
            # y_coding: our latent codec's name for the encoder flush
            parts["coder" if s.name == "y_coding" else s.name.rsplit(".", 1)[1]] += s.duration_ms
    total = wall_ms - sum(apart.values())
    return {"total": total, **parts, "other": total - sum(parts.values()), "outside": total - parts["network"], **apart}


def timed(fn: Callable[[Trace], T]) -> tuple[T, Trace, float]:
    trace = Trace("cpu")
    t0 = time.perf_counter()
    result = fn(trace)
    return result, trace, (time.perf_counter() - t0) * 1e3


@dataclass
class Setup:
    model: OSDiffModel
    backend: TorchBackend
    rounds: Rounds  # on the hyper params decoded from z, for the naive path
    naive_gc: NaiveGaussian
    y: Tensor
    z: Tensor


def ours(s: Setup, coder: str, out: dict[str, dict[str, float]], name: str) -> tuple[CodedLatent, Tensor]:
    """Our latent codec with one coder: encode, then decode, checking it reads back what it wrote."""
    cfg, eb, gc = s.model.config, s.model.entropy_bottleneck, s.model.gaussian
    not_y = ("z_coding", "hyper_synthesis")
    use_coder(coder)
    try:
        (coded, y_hat), trace, ms = timed(lambda t: compress_latent(s.backend, cfg, eb, gc, s.y, s.z, t))
        out[f"{name} encode"] = split(trace, ms, not_y)
        decoded = CodedLatent(coded.z_string, coded.y_string, coded.z_shape, [])
        y_hat_decoded, trace, ms = timed(lambda t: decompress_latent(s.backend, cfg, eb, gc, decoded, t))
        out[f"{name} decode"] = split(trace, ms, not_y)
    finally:
        use_coder("native")
    flat = [np.concatenate([a.reshape(-1) for a in c.symbols]) for c in (coded, decoded)]
    assert np.array_equal(*flat), f"{name} decoded other symbols than it coded"
    assert torch.equal(y_hat_decoded, y_hat), f"{name}: y_hat differs between encoder and decoder"
    return coded, y_hat


def repetition(s: Setup) -> tuple[dict[str, dict[str, float]], CodedLatent]:
    """Encode and decode y once with each path, checking that all write the same string and
    decode the same symbols from it."""
    out: dict[str, dict[str, float]] = {}
    coded, y_hat = ours(s, "native", out, "ours")
    assert ours(s, "compressai", out, "ours+cai")[0].y_string == coded.y_string, "the coders wrote different y strings"
    naive_string, trace, ms = timed(lambda t: naive_compress_y(s.rounds, s.naive_gc, s.y, t))
    out["naive encode"] = split(trace, ms)
    assert naive_string == coded.y_string, "the naive encoder wrote a different y string"
    (naive_y_hat, naive_symbols), trace, ms = timed(lambda t: naive_decompress_y(s.rounds, s.naive_gc, coded.y_string, t))
    out["naive decode"] = split(trace, ms)
    assert np.array_equal(np.concatenate(coded.symbols[1:]), np.concatenate(naive_symbols)), "the decoders disagree"
    assert torch.equal(naive_y_hat, y_hat), "y_hat differs between the paths"
    return {key: out[key] for op in ("encode", "decode") for key in (f"{p} {op}" for p in PATHS)}, coded


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide CPU kernels' speed (AVX2, AVX-512, VNNI, BF16, AMX),
    as /proc/cpuinfo names them: every CPU speed figure is reported with them."""
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16", "avx512_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


@click.command()
@click.option("--config", "config_name", default="full", show_default=True,
              help='Model config: "full" (the published architecture; 3.5 GB of weights), "demo" or a JSON file.')
@click.option("--height", default=512, show_default=True)
@click.option("--width", default=768, show_default=True)
@click.option("--repeat", default=5, show_default=True, help="timed repetitions (after one warm-up)")
@click.option("--seed", default=0, show_default=True, help="model weights and input image")
@click.option("--threads", default=1, show_default=True,
              help="torch intra-op threads. The coder is single-threaded, and on a 2-core machine shared "
                   "with other jobs a second thread makes every small tensor op between coder calls wait "
                   "on a descheduled OpenMP worker")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_JSON,
              show_default=True)
def main(config_name: str, height: int, width: int, repeat: int, seed: int, threads: int, json_path: Path) -> None:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = OSDiffModel.random(ModelConfig.named(config_name), seed)
    backend = TorchBackend(model)
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    (y0,) = backend.run("vae_encoder", image)
    y, z = backend.run("analysis", y0)
    (hyper,) = backend.run("hyper_synthesis", model.entropy_bottleneck.compress(z)[1])
    s = Setup(model, backend, Rounds(backend, model.config, hyper), NaiveGaussian(model.gaussian), y, z)
    print(f"model and latent ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    repetition(s)  # warm-up
    runs = [repetition(s) for _ in range(repeat)]
    times = {key: [r[key] for r, _ in runs] for key in runs[0][0]}
    med = {key: {p: statistics.median(r[p] for r in rs) for p in rs[0]} for key, rs in times.items()}
    ratios = {op: {p: med[f"ours {op}"][p] / med[f"naive {op}"][p] for p in RATIO_PARTS} for op in ("encode", "decode")}
    n_y, n_z = int(y.numel()), int(z.numel())
    coded = runs[0][1]
    y_bytes, z_bytes = len(coded.y_string), len(coded.z_string)
    bpp = (y_bytes + z_bytes) * 8 / (height * width)
    reached = {op: ratios[op]["outside"] <= TARGET_RATIO for op in ratios}
    ns_per_symbol = {key: m["coder"] / n_y * 1e6 for key, m in med.items()}

    print_table(med, ratios, n_y)
    print(f"\n{height}x{width}: {n_y:,} y symbols, {n_z:,} z symbols; y string {y_bytes:,} B, z string {z_bytes:,} B, "
          f"{bpp:.4f} bpp. {threads} torch thread(s); medians of {repeat} runs, each column on its own.\n"
          f"Not in the table: ours also spent {med['ours decode']['z_coding']:.1f} ms decoding z and "
          f"{med['ours decode']['hyper_synthesis']:.1f} ms in hyper synthesis per decode.\n"
          f"ours: the native coder; ours+cai and naive: CompressAI's C++ coder through osdiff.runtime.coder.ans.")
    for op in ("encode", "decode"):
        print(f"Target: ours {op} outside the networks <= 1/15 of naive's: ratio {ratios[op]['outside']:.3f} "
              f"(1/{1 / ratios[op]['outside']:.1f}), {'met' if reached[op] else 'NOT met'}.")

    result = {
        "benchmark": "entropy", "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads,
                    "load_average_before_after": [load_before[0], os.getloadavg()[0]],
                    "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "config": model.config.name, "image": {"height": height, "width": width}, "seed": seed, "repeat": repeat,
        "symbols": {"y": n_y, "z": n_z},
        "stream": {"y_bytes": y_bytes, "z_bytes": z_bytes, "bpp": bpp},
        "coder": {"ours": "native (osdiff.runtime._rans)",
                  "ours+cai": "CompressAI's C++ rANS coder (BufferedRansEncoder, RansDecoder) via osdiff.runtime.coder.ans",
                  "naive": "CompressAI's C++ rANS coder, called the reference's way"},
        "median_ms": med, "ratio_ours_over_naive": ratios, "coder_ns_per_symbol": ns_per_symbol,
        "target": {"ours_outside_over_naive_at_most": TARGET_RATIO, "met": reached},
        "symbols_per_s": {key: {"total": n_y / m["total"] * 1e3, "outside": n_y / m["outside"] * 1e3}
                          for key, m in med.items()},
        "runs_ms": times,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")


def print_table(med: dict[str, dict[str, float]], ratios: dict[str, dict[str, float]], n_y: int) -> None:
    head = f"{'':16}" + "".join(f"{p:>10}" for p in PARTS) + f"{'Msym/s':>9}{'Msym/s':>9}{'coder':>9}"
    print(head + "\n" + f"{'ms (median)':16}" + " " * 10 * len(PARTS) + f"{'total':>9}{'outside':>9}{'ns/sym':>9}")
    for key, m in med.items():
        rate = f"{n_y / m['total'] / 1e3:9.2f}{n_y / m['outside'] / 1e3:9.2f}{m['coder'] / n_y * 1e6:9.1f}"
        print(f"{key:16}" + "".join(f"{m[p]:10.1f}" for p in PARTS) + rate)
    for op, r in ratios.items():
        print(f"{'ours/naive ' + op[:3]:16}" + "".join(f"{r[p]:10.3f}" if p in r else f"{'':10}" for p in PARTS))


if __name__ == "__main__":
    main()
