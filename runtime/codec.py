"""The OSDiff codec: image -> .osd bytes -> image, on any backend.

    compress:   pad to a multiple of 64 (edge replication) -> vae_encoder -> analysis -> latent
                coding -> .osd
    decompress: .osd -> latent decoding -> check value -> synthesis (G_s) -> denoiser (one
                step, noise from the stream's seed) -> vae_decoder -> crop

Every malformed stream raises bitstream.StreamError before the heavy stages run.

Memory. Before a run, its peak is estimated (runtime/memory.py) and checked against what the
machine has, or `max_memory`; a run that cannot fit raises MemoryLimitError before allocating.
When the whole-image VAE does not fit, compress (tile="auto") picks the largest VAE tile that
does (runtime/tiling.py) and writes the decoder's tile grid into the stream, so that every
decoder decodes it the same way.

Padding. The stream stores the image size and the decoder only crops, so how the encoder fills
the image out to a multiple of the pad multiple is the encoder's choice: .osd streams replicate
the last row and column (OSD_PADDING), which costs fewer bits and keeps the image's colours at
its edges (benchmarks/padding.py has the measurement, docs/bitstream.md the rule); the
reference raw format keeps the original's zeros (REFERENCE_PADDING), so that the original
codes the same picture.

Threads. A Codec holds no per-call state: one may be shared by threads when its backend may
(runtime/backends/base.py says which may).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from osdiff.runtime import memory
from osdiff.runtime.backends.base import Backend, EntropyModels
from osdiff.runtime.bitstream import (
    ID_BYTES, TAG_TILES, OsdStream, StreamError, read_reference, symbol_check, tile_extension, tile_grid, write_reference,
)
from osdiff.runtime.latent_codec import CodedLatent, compress_latent, decompress_latent
from osdiff.runtime.noise import gaussian_noise
from osdiff.runtime.profiling import NO_TRACE, Trace
from osdiff.runtime.tiling import TILE_SIZES, TileGrid, run_tiled

# Default bound on decoded image size: a stream asks for a size before anything proves it
# genuine, so the decoder refuses absurd ones instead of allocating for them.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# How the encoder fills an image out to the pad multiple, as numpy.pad modes: "edge" replicates
# the last row and column, "constant" writes zeros (what the original implementation does),
# "reflect" and "symmetric" mirror the image without and with its edge pixel.
PADDINGS = ("edge", "constant", "reflect", "symmetric")
OSD_PADDING = "edge"
REFERENCE_PADDING = "constant"


def pad_image(image: np.ndarray, multiple: int, mode: str = OSD_PADDING) -> np.ndarray:
    """H x W x C -> H' x W' x C, H' and W' the next multiples of `multiple`, filled at the
    bottom and right by `mode` (one of PADDINGS; ValueError otherwise). Mirroring modes repeat
    the reflection where the padding is wider than the image (numpy.pad does)."""
    if mode not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {mode!r}")
    h, w = image.shape[:2]
    return np.pad(image, ((0, -h % multiple), (0, -w % multiple), (0, 0)), mode=mode)


def image_to_tensor(image: np.ndarray) -> Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W float32 in [0, 1] (exact division by 255, as the
    reference)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float() / 255.0


def tensor_to_image(x: Tensor) -> np.ndarray:
    """1 x 3 x H x W in [0, 1] -> H x W x 3 uint8; truncation, not rounding, as the reference."""
    return (x[0].permute(1, 2, 0).float().cpu() * 255).clamp(0, 255).to(torch.uint8).numpy()


class Codec:
    """max_memory: bytes a run may take in all (None: what the process holds plus what the
    machine has free, at the time of the run).

    reference_tables: the entropy tables the original implementation's raw stream format is
    coded with. "original" (default): derived as the original derives them on this CPU, so that
    its streams from a machine like this one decode; "canonical": the portable ones .osd
    streams always use (docs/entropy-tables.md)."""

    def __init__(self, backend: Backend, max_pixels: int = DEFAULT_MAX_PIXELS, max_memory: int | None = None,
                 reference_tables: str = "original") -> None:
        if reference_tables not in ("original", "canonical"):
            raise ValueError(f"reference_tables must be 'original' or 'canonical', not {reference_tables!r}")
        self.backend = backend
        self.models = backend.models
        self.cfg = backend.models.config
        self.max_pixels = max_pixels
        self.max_memory = max_memory
        self.reference_tables = reference_tables

    @property
    def reference_models(self) -> EntropyModels:
        return self.models.original if self.reference_tables == "original" else self.models

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.cfg.pad_multiple
        return -(-height // m) * m, -(-width // m) * m

    # --- encode ----------------------------------------------------------------------------

    def compress(self, image: np.ndarray, seed: int = 0, trace: Trace = NO_TRACE, tile: int | str | None = "auto",
                 padding: str = OSD_PADDING) -> bytes:
        return self.compress_batch([image], [seed], trace, tile, padding)[0]

    def compress_batch(self, images: list[np.ndarray], seeds: list[int] | None = None,
                       trace: Trace = NO_TRACE, tile: int | str | None = "auto", padding: str = OSD_PADDING) -> list[bytes]:
        """Images of one size: the VAE encoder and G_a run on the batch, the entropy coding
        per image (each image is its own stream). tile: "auto" (whole-image VAE when it fits
        in memory, else the largest tile that does), None (whole image or MemoryLimitError),
        or a tile side in pixels (a multiple of the pad multiple). padding: one of PADDINGS
        (any decodes: the decoder only crops; "constant" writes the streams of before edge
        padding)."""
        seeds = seeds if seeds is not None else [0] * len(images)
        with trace("memory_plan"):  # the first time for an image size, seconds (runtime/memory.py)
            grid = self.plan(*images[0].shape[:2], tile, batch=len(images))
        out = []
        for image, seed, coded in zip(images, seeds, self.encode_latents(images, trace, grid, padding=padding)):
            height, width = image.shape[:2]
            stream = OsdStream(height, width, seed, self.models.weights_id[:ID_BYTES], self.models.tables_id[:ID_BYTES],
                               coded.z_string, coded.y_string)
            if grid is not None:
                stream.extensions[TAG_TILES] = tile_extension(grid.tile, grid.overlap)
            stream.check = symbol_check(stream.header(), coded.symbols)
            out.append(stream.to_bytes())
        return out

    # --- memory ----------------------------------------------------------------------------

    def estimate(self, height: int, width: int, decode: bool, grid: TileGrid | None, batch: int = 1) -> memory.Estimate:
        """Peak memory of compressing (or decompressing) one image of height x width."""
        hp, wp = self.padded_size(height, width)
        what = f"{'decompressing' if decode else 'compressing'} a {height}x{width} (HxW) image" + \
            (f" (VAE in {grid.tile}-pixel tiles)" if grid else "")
        # the ONNX Runtime backend loads a graph's weights on its first run
        pending = getattr(self.backend, "unloaded_bytes", None)
        held = memory.resident(self.backend.device) + (pending(decode) if pending else 0)
        est = memory.estimate(self.cfg, self.backend.name, decode, hp, wp, what, grid.tile if grid else None, held)
        est.activations *= batch
        est.peak *= batch
        # ONNX Runtime's arena keeps what earlier runs took and hands it to this one: it is in the
        # process's resident memory already and must not be counted again with the activations
        arena = getattr(self.backend, "arena_bytes", None)
        if arena:
            est.resident -= min(arena(), est.peak)
        return est

    def _admit(self, est: memory.Estimate, remedy: str) -> None:
        """Refuse a run that does not fit (MemoryLimitError), else note it (_starting)."""
        memory.check(est, self._limit(), remedy)
        self._starting(est)

    def _starting(self, est: memory.Estimate) -> None:
        """Tell a backend with an arena the peak of the run that starts now."""
        note = getattr(self.backend, "note_run_peak", None)
        if note:
            note(est.peak)

    def _limit(self) -> int:
        return memory.budget(self.max_memory, self.backend.device)

    def plan(self, height: int, width: int, tile: int | str | None, batch: int = 1) -> TileGrid | None:
        """The VAE tile grid for an image (None: whole), checked to fit in memory for both
        compressing and decompressing; MemoryLimitError before anything is allocated if not."""
        m = self.cfg.pad_multiple
        hp, wp = self.padded_size(height, width)
        if hp * wp > self.max_pixels:  # before the memory estimate: the plainer reason
            raise ValueError(f"image of {height}x{width} exceeds the {self.max_pixels}-pixel limit")
        limit = self._limit()
        if tile == "auto":
            candidates = [None] + [TileGrid.default(t, m) for t in TILE_SIZES if t % m == 0 and t < max(hp, wp)]
        else:
            candidates = [None if tile is None else TileGrid.default(int(tile), m)]
        for grid in candidates:
            if grid is not None:
                grid.check(m)
            ests = [self.estimate(height, width, d, grid, batch) for d in (False, True)]
            worst = max(ests, key=lambda e: e.total)
            if worst.total <= limit:
                self._starting(ests[0])  # the compress
                return grid
        remedy = ("the stages at latent resolution do not fit either: use a smaller image or more memory"
                  if tile == "auto" else "use tiles (--tile auto, or a smaller --tile), a smaller image or more memory")
        if worst is ests[1]:
            worst.what += " (checked before compressing, so that no stream is written that cannot be decoded here)"
        memory.check(worst, limit, remedy)
        return None  # unreachable: check raised

    def compress_reference(self, image: np.ndarray, trace: Trace = NO_TRACE) -> bytes:
        """The original implementation's stream format (see decompress_reference), padded with
        zeros as the original pads; it has no room for a tile grid, so the image must fit whole."""
        with trace("memory_plan"):
            self.plan(*image.shape[:2], None)
        (coded,) = self.encode_latents([image], trace, models=self.reference_models, padding=REFERENCE_PADDING)
        return write_reference(coded.z_shape, coded.y_string, coded.z_string)

    def encode_latents(self, images: list[np.ndarray], trace: Trace = NO_TRACE, grid: TileGrid | None = None,
                       models: EntropyModels | None = None, padding: str = OSD_PADDING) -> list[CodedLatent]:
        if len({im.shape for im in images}) != 1:
            raise ValueError("a batch needs images of one size")
        hp, wp = self.padded_size(*images[0].shape[:2])
        if hp * wp > self.max_pixels:
            raise ValueError(f"image of {images[0].shape[0]}x{images[0].shape[1]} exceeds the {self.max_pixels}-pixel limit")
        # padded as uint8, before the float conversion: a quarter of the memory of padding floats
        x = torch.cat([image_to_tensor(pad_image(im, self.cfg.pad_multiple, padding)) for im in images])
        run = self.backend.run
        with trace("upload"):
            x = x.to(self.backend.device)
        with trace("vae_encoder"):
            if grid is None:
                (y0,) = run("vae_encoder", x)
            else:
                y0 = run_tiled(lambda t: run("vae_encoder", t)[0], x, grid, 1, self.cfg.latent_downsample)
        with trace("analysis"):
            y, z = run("analysis", y0)
        m = models or self.models
        return [compress_latent(self.backend, self.cfg, m.entropy_bottleneck, m.gaussian, y[i : i + 1], z[i : i + 1], trace)[0]
                for i in range(len(images))]

    # --- decode ----------------------------------------------------------------------------

    def decompress(self, data: bytes, trace: Trace = NO_TRACE) -> np.ndarray:
        """.osd bytes -> H x W x 3 uint8."""
        return self.decompress_batch([data], trace)[0]

    def decompress_tensor(self, data: bytes, trace: Trace = NO_TRACE) -> Tensor:
        """.osd bytes -> 1 x 3 x H x W float32 in [0, 1], before the uint8 conversion."""
        return self._decompress(self._parse([data], trace), trace)

    def decompress_batch(self, datas: list[bytes], trace: Trace = NO_TRACE) -> list[np.ndarray]:
        """Streams of one image size: entropy decoding per stream, then G_s, the denoiser and
        the VAE decoder on the batch."""
        images = self._decompress(self._parse(datas, trace), trace)
        return [tensor_to_image(images[i : i + 1]) for i in range(len(datas))]

    def _parse(self, datas: list[bytes], trace: Trace) -> list[OsdStream]:
        with trace("parse"):
            streams = [OsdStream.from_bytes(d) for d in datas]
        weights_id, tables_id = self.models.weights_id[:ID_BYTES], self.models.tables_id[:ID_BYTES]
        for stream in streams:
            if stream.weights_id != weights_id:
                raise StreamError(f"the stream was made with other model weights (weights id {stream.weights_id.hex()}, "
                                  f"this model {weights_id.hex()})")
            if stream.tables_id != tables_id:
                raise StreamError(
                    f"the stream was coded with other entropy tables (tables id {stream.tables_id.hex()}, this decoder "
                    f"{tables_id.hex()}): same weights, but its encoder derived the CDF tables differently (another "
                    "osdiff-engine version, or a modified build), so its symbols cannot be read here")
            self._check_size(stream.height, stream.width)
        if len({(s.height, s.width, s.extensions.get(TAG_TILES)) for s in streams}) != 1:
            raise ValueError("a batch needs streams of one image size and tile grid")
        return streams

    def _decompress(self, streams: list[OsdStream], trace: Trace) -> Tensor:
        f = self.cfg.pad_multiple
        hp, wp = self.padded_size(streams[0].height, streams[0].width)
        tiles = tile_grid(streams[0])
        grid = None if tiles is None else TileGrid(*tiles)
        if grid is not None:
            try:
                grid.check(f)
            except ValueError as e:
                raise StreamError(f"the stream's {e}") from e
        with trace("memory_plan"):
            est = self.estimate(streams[0].height, streams[0].width, True, grid, len(streams))
            self._admit(est, "decode it on a machine with more memory (the tile grid is fixed by the "
                             "stream; re-encode with a smaller --tile to need less)")
        y_hats = []
        for stream in streams:
            coded = CodedLatent(stream.z_string, stream.y_string, (hp // f, wp // f), [])
            y_hats.append(self._decode_latent(coded, trace))
            if symbol_check(stream.header(), coded.symbols) != stream.check:
                raise StreamError(
                    "check value mismatch: the stream is corrupt, or this decoder derived entropy-model "
                    "indexes differently from the encoder (another backend or precision)"
                )
        size = (streams[0].height, streams[0].width)
        return self.decode_image(torch.cat(y_hats), [s.seed for s in streams], size, trace, grid=grid)

    def decompress_reference(self, data: bytes, height: int, width: int, seed: int = 0, trace: Trace = NO_TRACE) -> np.ndarray:
        """The original implementation's stream format, which stores no image size (the user
        gives it), no seed and no check value (a desynchronized decode cannot be detected),
        read with the `reference_tables` chosen at construction."""
        return tensor_to_image(self.decompress_reference_tensor(data, height, width, seed, trace))

    def decompress_reference_tensor(self, data: bytes, height: int, width: int, seed: int = 0,
                                    trace: Trace = NO_TRACE, x_T: Tensor | None = None,
                                    models: EntropyModels | None = None) -> Tensor:
        """decompress_reference before the uint8 conversion: 1 x 3 x H x W float32 in [0, 1].
        x_T: the noise instead of the seed's; models: the entropy models to read the stream
        with instead of `reference_tables` (a golden set's own tables, in verify-reference)."""
        z_shape, y_string, z_string = read_reference(data)
        hp, wp = self._check_size(height, width)
        f = self.cfg.pad_multiple
        if z_shape != (hp // f, wp // f):
            raise StreamError(f"the stream's z shape {z_shape} does not fit a {height}x{width} image")
        with trace("memory_plan"):
            self._admit(self.estimate(height, width, True, None),
                        "the reference format decodes whole images only: use a machine with more memory")
        y_hat = self._decode_latent(CodedLatent(z_string, y_string, z_shape, []), trace, models or self.reference_models)
        return self.decode_image(y_hat, seed, (height, width), trace, x_T)

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        hp, wp = self.padded_size(height, width)
        if hp * wp > self.max_pixels:
            raise StreamError(f"stream asks for a {height}x{width} image, over the {self.max_pixels}-pixel limit")
        return hp, wp

    def _decode_latent(self, coded: CodedLatent, trace: Trace, models: EntropyModels | None = None) -> Tensor:
        m = models or self.models
        try:
            return decompress_latent(self.backend, self.cfg, m.entropy_bottleneck, m.gaussian, coded, trace)
        except ValueError as e:
            if isinstance(e, StreamError):
                raise
            raise StreamError(f"the entropy-coded data is inconsistent with its header: {e}") from e

    def decode_image(self, y_hat: Tensor, seed: int | list[int], size: tuple[int, int], trace: Trace = NO_TRACE,
                     x_T: Tensor | None = None, grid: TileGrid | None = None) -> Tensor:
        """y_hat (B images) -> B x 3 x H x W float32 in [0, 1], cropped, on the CPU. seed: one
        per image; x_T: the noise, when not drawn from the seeds (golden-data checks give the
        reference's own); grid: the VAE decoder's tiles (None: whole image)."""
        b, _, h, w = y_hat.shape
        with trace("noise"):
            if x_T is None:
                seeds = [seed] * b if isinstance(seed, int) else seed
                # the latent y_c that G_s makes is twice y's resolution
                shape = (1, self.cfg.vae.embed_dim, 2 * h, 2 * w)
                x_T = torch.from_numpy(np.concatenate([gaussian_noise(s, shape) for s in seeds]))
            x_T = x_T.to(self.backend.device)
        decode_tail = getattr(self.backend, "decode_tail", None)
        if decode_tail is not None and grid is None:  # the backend runs the three stages as one CUDA graph
            with trace("synthesis+denoiser+vae_decoder"):
                image = decode_tail(y_hat, x_T)
        else:
            run = self.backend.run
            with trace("synthesis"):
                (y_c,) = run("synthesis", y_hat)
            with trace("denoiser"):
                (y_r,) = run("denoiser", y_c, x_T)
            with trace("vae_decoder"):
                if grid is None:
                    (image,) = run("vae_decoder", y_r)
                else:
                    image = run_tiled(lambda t: run("vae_decoder", t)[0], y_r, grid, self.cfg.latent_downsample, 1)
        with trace("download"):
            return image[:, :, : size[0], : size[1]].float().cpu()
