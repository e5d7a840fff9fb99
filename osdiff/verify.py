"""`osdiff verify-reference DIR`: check this install against a golden set made by the original
OSDiff implementation (layout and tolerances: reference/README.md, sections 1, 4-6 and 8).

Every stage runs in fp32 on the CPU through the project's own loader (OSDiffModel.load),
modules and codec, and is fed the golden value of its input, so an error shows in the stage
that makes it instead of piling up downstream. The one exception is the end-to-end decode of
stream.bin, which must still land within tolerance.

    floats               max |ours - golden| <= 1e-5 * max |golden|, per tensor
    integers, strings    equal
    output.png           within +-1 (truncating uint8 conversion)
    coding margins       our float error below the margin the golden set was made with
    entropy tables       information, not a check (below)

The entropy coding runs on the golden set's own tables (scale table, Gaussian and bottleneck
CDFs from symbols.npz): the original derives them at load time in float32 with the float
kernels of the CPU it runs on, so a golden set made on another machine may hold tables that
differ from this machine's in a few entries (docs/entropy-tables.md), and with them strings
that no other table reproduces. Coding with the golden tables, every symbol, index, string and
the stream file must come out exact, and decoding the golden strings and stream.bin must give
the golden symbols and image: that checks our modules, coder and whole pipeline on any machine.
How our canonical tables (runtime/entropy.py) and the original's own derivation on this CPU
(compressai 1.2.4's formula in torch float32, runtime/f32_native.py) compare with the golden
machine's is reported, entry by entry, in informational rows: a fact about the original's
portability (and about the set), not a failure of ours. "(coder alone)" rows run the rANS
coder on the golden symbols and indexes only, to tell a coder fault from a pipeline fault.

A missing file, a missing tensor or a stage that cannot run is a failed row, never a crash;
so is a golden value that no check compares (nothing is skipped silently).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.config import ConfigError, ModelConfig
from osdiff.export.checkpoint import CheckpointError, describe, read_state_dict
from osdiff.export.model import OSDiffModel
from osdiff.export.models.lfgcm import unsqueeze_anchor, unsqueeze_nonanchor
from osdiff.export.models.unet import Denoiser, timestep_embedding
from osdiff.export.models.vae import VAEDecoder, VAEEncoder
from osdiff.files import read_image
from osdiff.runtime.backends.base import EntropyModels
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.bitstream import write_reference
from osdiff.runtime.codec import Codec, image_to_tensor, tensor_to_image
from osdiff.runtime.coder import CdfTables, Decoder, Encoder
from osdiff.runtime.latent_codec import CodedLatent, compress_latent, decompress_latent

REL_TOL = 1e-5
# golden files that hold tensors, by the prefix their rows carry
SOURCES = {"golden": "golden.safetensors", "cddm_trace": "cddm_trace.safetensors", "symbols": "symbols.npz"}


@dataclass
class Check:
    name: str  # "<source>/<tensor>" for golden tensors, the file name for files
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float  # relative to max |golden| (to the margin, for margin rows)
    passed: bool
    note: str = ""
    info: bool = False  # information only (how this machine's tables compare): never fails


class _Missing(Exception):
    """A golden input that a stage needs is not in the set."""


def verify_reference(directory: str | Path) -> list[Check]:
    """Every check of the golden set in `directory`, in pipeline order."""
    return _Verifier(Path(directory)).run()


def format_table(checks: list[Check]) -> str:
    width = max([len(c.name) for c in checks] + [6])
    lines = [f"{'tensor':<{width}}  {'shape':<14} {'max abs err':>11} {'max rel err':>11}  result"]
    num = lambda x: "-" if math.isnan(x) else f"{x:.3g}"  # noqa: E731
    for c in checks:
        shape = "x".join(map(str, c.shape)) or ("-" if math.isnan(c.max_abs_err) else "scalar")
        line = f"{c.name:<{width}}  {shape:<14} {num(c.max_abs_err):>11} {num(c.max_rel_err):>11}  "
        lines.append(line + ("info" if c.info else "pass" if c.passed else "FAIL") + (f"  {c.note}" if c.note else ""))
    counted = [c for c in checks if not c.info]
    failed = sum(not c.passed for c in counted)
    lines.append(f"{len(counted)} checks: {len(counted) - failed} passed, {failed} failed")
    if len(counted) < len(checks):
        lines.append(f"{len(checks) - len(counted)} info rows: the entropy tables this machine derives (ours, and the "
                     "original's float32 derivation) against the golden machine's, which drove the coding above; "
                     "a difference is the original's portability, not a failure")
    return "\n".join(lines)


def find_checkpoints(directory: Path) -> tuple[Path, Path | None]:
    """(SD 2.1, OSDiff) checkpoints of a golden set, told apart by their keys; else one
    combined file and None."""
    found: dict[str, Path] = {}
    seen = []
    data_files = set(SOURCES.values())
    candidates = sorted(directory.glob("*.ckpt")) + sorted(directory.glob("*.safetensors"))
    for path in (p for p in candidates if p.name not in data_files):
        try:
            kind = describe(read_state_dict(path))
        except CheckpointError as e:
            kind = str(e)
        seen.append(f"{path.name}: {kind}")
        for key, marker in (("sd", "Stable Diffusion 2"), ("osdiff", "OSDiff ("), ("combined", "combined")):
            if marker in kind:
                found.setdefault(key, path)
        if "sd" in found and "osdiff" in found:
            return found["sd"], found["osdiff"]
    if "combined" in found:
        return found["combined"], None
    listing = "; ".join(seen) or "no .ckpt or .safetensors file"
    raise CheckpointError(f"no SD 2.1 + OSDiff checkpoint pair and no combined checkpoint ({listing})")


class _Verifier:
    # set by run() once the model has loaded
    model: OSDiffModel
    cfg: ModelConfig
    backend: TorchBackend
    codec: Codec

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._golden_models: EntropyModels | None = None
        self.checks: list[Check] = []
        self.data: dict[str, dict[str, Tensor]] = {}
        self.covered: set[tuple[str, str]] = set()

    # --- rows ----------------------------------------------------------------------------------

    def fail(self, name: str, note: str) -> None:
        self.checks.append(Check(name, (), math.nan, math.nan, False, note))

    def close(self, src: str, key: str, ours: Tensor | np.ndarray, suffix: str = "") -> None:
        self._compare(src, key, ours, suffix, lambda err, scale: err <= REL_TOL * scale)

    def exact(self, src: str, key: str, ours: Tensor | np.ndarray | float, suffix: str = "") -> None:
        self._compare(src, key, ours, suffix, lambda err, scale: err == 0)
        last = self.checks[-1]
        if not last.passed and not last.note and (src, key) in self.covered:
            golden = self.get(src, key).reshape(-1)
            mine = (ours if isinstance(ours, Tensor) else torch.from_numpy(np.array(ours))).reshape(-1)
            last.note = f"{int((mine != golden).sum())} of {golden.numel()} entries differ"

    def golden(self, src: str, key: str, row: str) -> Tensor | None:
        """The golden tensor, marked as checked; None (and a failed row named `row`) if the set
        lacks it."""
        try:
            golden = self.get(src, key)
        except _Missing as e:
            self.fail(row, str(e))
            return None
        self.covered.add((src, key))
        return golden

    def _compare(self, src: str, key: str, ours: Tensor | np.ndarray | float, suffix: str,
                 passes: Callable[[float, float], bool]) -> None:
        name = f"{src}/{key}{suffix}"
        golden = self.golden(src, key, name)
        if golden is None:
            return
        ours = ours if isinstance(ours, Tensor) else torch.from_numpy(np.array(ours))
        self.checks.append(_check(name, ours, golden, passes))

    def same_bytes(self, filename: str, ours: bytes, suffix: str = "") -> None:
        name = filename + suffix
        try:
            golden = self.file(filename)
        except _Missing as e:
            self.fail(name, str(e))
            return
        if ours == golden:
            self.checks.append(Check(name, (len(golden),), 0.0, 0.0, True))
            return
        first = next((i for i, (a, b) in enumerate(zip(ours, golden)) if a != b), min(len(ours), len(golden)))
        note = f"ours {len(ours)} bytes, first difference at byte {first}"
        self.checks.append(Check(name, (len(golden),), math.nan, math.nan, False, note))

    def pixels(self, ours: Tensor, suffix: str = "") -> None:
        """output.png against our decoded image, both as the reference converts to uint8."""
        name = "output.png" + suffix
        try:
            golden = torch.from_numpy(read_image(self.path("output.png"))).int()
        except _Missing as e:
            self.fail(name, str(e))
            return
        self.checks.append(_check(name, torch.from_numpy(tensor_to_image(ours)).int(), golden, lambda err, scale: err <= 1))

    def margin(self, key: str, err: float) -> None:
        """Our float error on the values a coding decision is taken from, against the smallest
        distance of the golden values to such a decision: below it, every decision matches."""
        name = f"symbols/{key}"
        golden = self.golden("symbols", key, name)
        if golden is None:
            return
        m = float(golden)
        self.checks.append(Check(name, (), err, err / m if m else math.inf, err < m, f"margin {m:.3g}"))

    def coder(self, filename: str, prefix: str, symbols: Tensor, indexes: Tensor) -> None:
        """The rANS coder alone, on the golden set's own symbols, indexes and tables: it writes
        the golden string, and reads it back to the golden symbols."""
        tables = self.golden_tables(prefix)
        encoder = Encoder()
        encoder.encode(symbols.numpy(), indexes.numpy(), tables)
        self.same_bytes(filename, encoder.flush(), " (coder alone)")
        decoded = Decoder(self.file(filename), tables, symbols.numel()).decode(indexes.numpy())
        name = f"{filename} (coder alone, decoded)"
        self.checks.append(_check(name, torch.from_numpy(decoded).reshape(symbols.shape), symbols, lambda err, scale: err == 0))

    def golden_tables(self, prefix: str) -> CdfTables:
        cdf, lengths, offsets = (self.get("symbols", f"{prefix}_{k}").numpy() for k in ("quantized_cdf", "cdf_length", "offset"))
        return CdfTables([row[:n].tolist() for row, n in zip(cdf, lengths)], offsets.tolist())

    def golden_models(self) -> EntropyModels:
        """Our entropy models with the golden set's tables in place of the ones this machine
        derives: what every coding row codes with (see the module docstring)."""
        if self._golden_models is None:
            m = self.model.entropy_models
            gaussian = m.gaussian.with_tables(self.get("symbols", "gc_scale_table").numpy(), self.golden_tables("gc"))
            eb = m.entropy_bottleneck.with_tables(self.golden_tables("eb"))
            self._golden_models = EntropyModels(m.config, eb, gaussian, m.weights_id)
        return self._golden_models

    def differences(self, src: str, key: str, derived: dict[str, Tensor | np.ndarray]) -> None:
        """An info row: in how many entries each of this machine's derivations of a golden
        table differs from it."""
        name = f"{src}/{key}"
        golden = self.golden(src, key, name)
        if golden is None:
            return
        notes = []
        for who, ours in derived.items():
            ours = ours if isinstance(ours, Tensor) else torch.from_numpy(np.asarray(ours))
            same_shape = ours.shape == golden.shape
            notes.append(f"{who} {int((ours != golden).sum())}" if same_shape else f"{who} shape {tuple(ours.shape)}")
        note = f"entries that differ from the golden machine's: {', '.join(notes)} of {golden.numel()}"
        self.checks.append(Check(name, tuple(golden.shape), math.nan, math.nan, True, note, info=True))

    # --- golden data ------------------------------------------------------------------------------

    def get(self, src: str, key: str) -> Tensor:
        if src not in self.data:
            raise _Missing(f"{SOURCES[src]} is missing or unreadable")
        if key not in self.data[src]:
            raise _Missing(f"{SOURCES[src]} has no '{key}'")
        return self.data[src][key]

    def path(self, name: str) -> Path:
        if not (self.dir / name).is_file():
            raise _Missing(f"{name} is missing")
        return self.dir / name

    def file(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def _load_sources(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for src, filename in SOURCES.items():
            path = self.dir / filename
            if not path.is_file():
                self.fail(filename, "missing")
                continue
            try:
                if path.suffix == ".npz":
                    with np.load(path) as npz:
                        self.data[src] = {k: torch.from_numpy(npz[k]) for k in npz.files}
                else:
                    self.data[src] = load_file(str(path))
            except (OSError, ValueError, SafetensorError) as e:
                self.fail(filename, f"unreadable: {e}")

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> list[Check]:
        self._load_sources()
        try:
            cfg = ModelConfig.from_json(self.dir / "config.json")
            sd, osdiff = find_checkpoints(self.dir)
            self.model = OSDiffModel.load(sd, osdiff, cfg)
        except (ConfigError, CheckpointError) as e:
            self.fail("model", " ".join(str(e).split()))  # one line, even for a key report
            return self.checks
        self.cfg = cfg
        self.backend = TorchBackend(self.model)
        self.codec = Codec(self.backend)
        stages = (self.input_image, self.vae_encoder, self.analysis, self.z_coding, self.y_coding, self.decoding,
                  self.synthesis, self.noise, self.denoiser, self.vae_decoder, self.constants, self.end_to_end)
        for stage in stages:
            try:
                with torch.inference_mode():
                    stage()
            except _Missing as e:
                self.fail(f"stage {stage.__name__}", str(e))
            except Exception as e:  # a stage that cannot run is a failed row; the others still run
                self.fail(f"stage {stage.__name__}", f"{type(e).__name__}: {e}".splitlines()[0])
        for src, tensors in self.data.items():
            unchecked = sorted(k for k in tensors if (src, k) not in self.covered)
            if unchecked:
                self.fail(SOURCES[src], f"{len(unchecked)} tensor(s) not checked: {', '.join(unchecked)}")
        return self.checks

    def input_image(self) -> None:
        self.close("golden", "image", image_to_tensor(read_image(self.path("input.png"))))

    def vae_encoder(self) -> None:
        image = self.get("golden", "image")
        hp, wp = self.codec.padded_size(*image.shape[2:])
        image = F.pad(image, (0, wp - image.shape[3], 0, hp - image.shape[2]))  # zeros, as the original pads
        vae = self.model.stages["vae_encoder"]
        assert isinstance(vae, VAEEncoder)
        with _outputs_of({"vae_moments": vae.quant_conv}) as seen:
            (y0,) = self.backend.run("vae_encoder", image)
        self.close("golden", "vae_moments", seen["vae_moments"])
        self.close("golden", "y0", y0)

    def analysis(self) -> None:
        y, z = self.backend.run("analysis", self.get("golden", "y0"))
        self.close("golden", "lfgcm_y", y)
        self.close("golden", "lfgcm_z", z)

    def z_coding(self) -> None:
        eb = self.golden_models().entropy_bottleneck
        z = self.get("golden", "lfgcm_z")
        string, z_hat, symbols = eb.compress(z)
        self.close("golden", "lfgcm_z_hat", z_hat)
        self.same_bytes("z_string.bin", string)
        self.exact("symbols", "z_symbols", symbols[0])
        indexes = eb._indexes(tuple(z.shape))[0]
        self.exact("symbols", "z_indexes", indexes)
        self.coder("z_string.bin", "eb", self.get("symbols", "z_symbols"), self.get("symbols", "z_indexes"))
        self.exact("symbols", "z_escape_count", _escapes(symbols, indexes, eb.tables))
        _, z_ours = self.backend.run("analysis", self.get("golden", "y0"))
        self.margin("z_rounding_margin_min", _max_err(z_ours, z))
        self.close("golden", "lfgcm_hyper_params", self.backend.run("hyper_synthesis", self.get("golden", "lfgcm_z_hat"))[0])

    def y_coding(self) -> None:
        m = self.golden_models()
        gaussian = m.gaussian
        y, z = self.get("golden", "lfgcm_y"), self.get("golden", "lfgcm_z")
        recorder = _Recorder(self.backend)
        coded, y_hat = compress_latent(recorder, self.cfg, m.entropy_bottleneck, gaussian, y, z)
        self.same_bytes("y_string.bin", coded.y_string)
        self.same_bytes("stream.bin", write_reference(coded.z_shape, coded.y_string, coded.z_string))
        self.close("golden", "lfgcm_y_hat", y_hat)

        # the entropy graphs ran in coding order (anchor 0, non-anchor 0, anchor 1, ...), as the symbols
        params = [out[:2] for graph, out in recorder.outputs if graph.startswith("entropy_")]
        indexes = [gaussian.build_indexes(scales) for scales, _ in params]
        for prefix, (scales, means), idx, sym in zip(_rounds(self.cfg), params, indexes, coded.symbols[1:]):
            self.exact("symbols", prefix + "symbols", sym.reshape(scales.shape)[0])
            self.exact("symbols", prefix + "indexes", idx[0])
            self.close("symbols", prefix + "means", means[0])
            self.close("symbols", prefix + "scales", scales[0])
        # back to the full layout: each slice's anchor and non-anchor halves interleaved
        anchors, nonanchors = params[0::2], params[1::2]
        scales_hat, means_hat = (
            torch.cat([unsqueeze_anchor(a[i]) + unsqueeze_nonanchor(n[i]) for a, n in zip(anchors, nonanchors)], 1)
            for i in (0, 1)
        )
        self.close("golden", "lfgcm_scales_hat", scales_hat)
        self.close("golden", "lfgcm_means_hat", means_hat)

        self.coder("y_string.bin", "gc", self.get("symbols", "y_symbols_coding_order"),
                   self.get("symbols", "y_indexes_coding_order"))
        y_symbols = np.concatenate([s.reshape(-1) for s in coded.symbols[1:]])
        y_indexes = torch.cat([idx.reshape(-1) for idx in indexes]).numpy()
        self.exact("symbols", "y_symbols_coding_order", y_symbols)
        self.exact("symbols", "y_indexes_coding_order", y_indexes)
        self.exact("symbols", "y_escape_count", _escapes(y_symbols, y_indexes, gaussian.tables))
        self.exact("symbols", "scales_at_or_below_lower_bound_count", int((scales_hat <= gaussian.scale_table[0]).sum()))

        y_ours, _ = self.backend.run("analysis", self.get("golden", "y0"))
        self.margin("y_rounding_margin_min", _max_err(y_ours - means_hat, y - self.get("golden", "lfgcm_means_hat")))
        golden_scales = self.get("golden", "lfgcm_scales_hat")
        unclamped = golden_scales > gaussian.scale_table[0]
        rel = ((scales_hat - golden_scales).abs() / golden_scales)[unclamped]
        self.margin("scale_table_relative_margin_min", float(rel.max()) if rel.numel() else 0.0)

    def decoding(self) -> None:
        m = self.golden_models()
        z_hat = self.get("golden", "lfgcm_z_hat")
        z_shape = (z_hat.shape[2], z_hat.shape[3])
        coded = CodedLatent(self.file("z_string.bin"), self.file("y_string.bin"), z_shape, [])
        y_hat = decompress_latent(self.backend, self.cfg, m.entropy_bottleneck, m.gaussian, coded)
        self.close("golden", "lfgcm_y_hat", y_hat, " (decoded)")
        self.exact("symbols", "z_symbols", coded.symbols[0].reshape(z_hat.shape[1:]), " (decoded)")
        for prefix, symbols in zip(_rounds(self.cfg), coded.symbols[1:]):
            key = prefix + "symbols"
            self.exact("symbols", key, symbols.reshape(self.get("symbols", key).shape), " (decoded)")

    def synthesis(self) -> None:
        self.close("golden", "c_latent", self.backend.run("synthesis", self.get("golden", "lfgcm_y_hat"))[0])
        self.close("golden", "context", self.model.context)

    def noise(self) -> None:
        """x_T is only ever an input: check that it is the draw config.json names, so that a
        damaged x_T is not blamed on the UNet."""
        seed = json.loads(self.file("config.json"))["seeds"]["x_T"]
        x_T = self.get("golden", "x_T")
        self.close("golden", "x_T", torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed)))

    def denoiser(self) -> None:
        den = self.model.stages["denoiser"]
        assert isinstance(den, Denoiser)
        x_T, hint, context = (self.get("golden", k) for k in ("x_T", "c_latent", "context"))
        t = torch.full((1,), den.timestep, dtype=torch.long)
        unet, cddm = den.unet, den.control
        ctrl = cddm.control_model
        self.close("cddm_trace", "timestep_embedding", timestep_embedding(t, unet.model_channels))
        watch: dict[str, nn.Module] = {"base_time_embed": unet.time_embed, "ctrl_time_embed": ctrl.time_embed}
        for i in range(len(unet.input_blocks)):
            watch[f"base_input_block{i:02d}"] = unet.input_blocks[i]  # before the control addition
            watch[f"ctrl_input_block{i:02d}"] = ctrl.input_blocks[i]
            watch[f"zero_conv_enc{i:02d}"] = cddm.enc_zero_convs_out[i]
        watch.update(base_middle_block=unet.middle_block, ctrl_middle_block=ctrl.middle_block,
                     zero_conv_mid=cddm.middle_block_out)
        for j in range(len(unet.output_blocks)):
            watch[f"zero_conv_dec{j:02d}"] = cddm.dec_zero_convs_out[j]
            watch[f"base_output_block{j:02d}"] = unet.output_blocks[j]
        with _outputs_of(watch) as trace:
            eps = den.eps(x_T, hint, t, context)
        for name, value in trace.items():
            self.close("cddm_trace", name, value)
        self.close("cddm_trace", "eps", eps)
        self.close("golden", "eps", eps)
        self.close("golden", "eps_unet_only", unet(x_T, t, context))

        # y_r through the stage's own forward (eq. 8 fused in), with the golden context in place
        own = den.context.clone()
        den.context.copy_(context)
        try:
            self.close("golden", "y_r", self.backend.run("denoiser", hint, x_T)[0])
        finally:
            den.context.copy_(own)

    def vae_decoder(self) -> None:
        vae = self.model.stages["vae_decoder"]
        assert isinstance(vae, VAEDecoder)
        with _outputs_of({"vae_post_quant": vae.post_quant_conv, "decoded_raw": vae.decoder}) as seen:
            (decoded,) = self.backend.run("vae_decoder", self.get("golden", "y_r"))
        self.close("golden", "vae_post_quant", seen["vae_post_quant"])
        self.close("golden", "decoded_raw", _crop_like(seen["decoded_raw"], self.get("golden", "decoded_raw")))
        decoded = _crop_like(decoded, self.get("golden", "image"))
        self.close("golden", "decoded", decoded)
        self.pixels(decoded)

    def constants(self) -> None:
        d, den = self.cfg.diffusion, self.model.stages["denoiser"]
        assert isinstance(den, Denoiser)
        # as the reference's SpacedSampler recomputes it: float64 schedule, cast to float32
        betas = torch.linspace(d.linear_start**0.5, d.linear_end**0.5, d.timesteps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)[d.timestep].float()
        self.exact("golden", "alphas_cumprod_999", abar.reshape(1))
        self.exact("golden", "sampler_sqrt_recip_alphas_cumprod", torch.tensor([den.c1]))
        self.exact("golden", "sampler_sqrt_recipm1_alphas_cumprod", torch.tensor([den.c2]))
        # the tables this machine derives, ours (canonical) and the original's (its float32
        # kernels here), against the golden machine's, which drove the coding: information
        derivations = {"ours": self.model.entropy_models,
                       f"original's here ({torch.backends.cpu.get_cpu_capability()})": self.model.entropy_models.original}
        for src, key in (("golden", "scale_table"), ("symbols", "gc_scale_table")):
            self.differences(src, key, {who: m.gaussian.scale_table for who, m in derivations.items()})
        for prefix, which in (("gc", "gaussian"), ("eb", "entropy_bottleneck")):
            for i, name in enumerate(("quantized_cdf", "cdf_length", "offset")):
                self.differences("symbols", f"{prefix}_{name}",
                                 {who: getattr(m, which).tables.padded()[i] for who, m in derivations.items()})
        self.exact("symbols", "z_medians", self.model.entropy_bottleneck.medians)
        self.exact("symbols", "slice_ch", torch.tensor(self.cfg.lfgcm.slice_ch))

    def end_to_end(self) -> None:
        """stream.bin -> pixels through Codec.decompress_reference, with the golden noise and
        tables."""
        data = self.file("stream.bin")
        image = self.get("golden", "image")
        decoded = self.codec.decompress_reference_tensor(data, image.shape[2], image.shape[3], x_T=self.get("golden", "x_T"),
                                                         models=self.golden_models())
        self.close("golden", "decoded", decoded, " (stream.bin)")
        self.pixels(decoded, " (stream.bin)")


class _Recorder:
    """A runner that keeps what every graph returned, to see inside compress_latent."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend, self.device = backend, backend.device
        self.outputs: list[tuple[str, tuple[Tensor, ...]]] = []

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.backend.run(graph, *inputs)
        self.outputs.append((graph, out))
        return out


def _rounds(cfg: ModelConfig) -> list[str]:
    """symbols.npz's name prefix of each coding round, in coding order."""
    return [f"slice{k}_{half}_" for k in range(len(cfg.lfgcm.slice_ch)) for half in ("anchor", "nonanchor")]


@contextmanager
def _outputs_of(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """What each module returned while the block ran (forward hooks), by name, in call order."""
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        return lambda module, args, out: seen.__setitem__(name, out)

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _check(name: str, ours: Tensor, golden: Tensor, passes: Callable[[float, float], bool]) -> Check:
    shape = tuple(golden.shape)
    if tuple(ours.shape) != shape:
        return Check(name, shape, math.nan, math.nan, False, f"shape {tuple(ours.shape)}, golden {shape}")
    err = _max_err(ours, golden)
    scale = float(golden.double().abs().max()) if golden.numel() else 0.0
    rel = err / scale if scale else (0.0 if err == 0 else math.inf)
    return Check(name, shape, err, rel, passes(err, scale), "not finite" if math.isnan(err) else "")


def _max_err(ours: Tensor, golden: Tensor) -> float:
    """max |ours - golden| (NaN if either holds one)."""
    if not golden.numel():
        return 0.0
    diff = (ours.double() - golden.double()).abs()
    return math.nan if diff.isnan().any() else float(diff.max())


def _crop_like(x: Tensor, like: Tensor) -> Tensor:
    """Our padded-size output cropped to the golden image size (the reference crops at the end)."""
    return x[..., : like.shape[-2], : like.shape[-1]]


def _escapes(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> int:
    """How many symbols fall outside their CDF's support (compressai codes them by bypass)."""
    _, lengths, offsets = tables.padded()
    idx = np.asarray(indexes).reshape(-1).astype(np.int64)
    value = np.asarray(symbols).reshape(-1) - offsets[idx]
    return int(((value < 0) | (value >= lengths[idx] - 2)).sum())
