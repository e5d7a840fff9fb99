"""The OSDiff codec: image -> .osd bytes -> image, on any backend.

    compress:   pad to a multiple of 64 -> vae_encoder -> analysis -> latent coding -> .osd
    decompress: .osd -> latent decoding -> check value -> synthesis (G_s) -> denoiser (one
                step, noise from the stream's seed) -> vae_decoder -> crop

Every malformed stream raises bitstream.StreamError before the heavy stages run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from osdiff.runtime.backends.base import Backend, EntropyModels
from osdiff.runtime.bitstream import ID_BYTES, OsdStream, StreamError, read_reference, symbol_check, write_reference
from osdiff.runtime.latent_codec import CodedLatent, compress_latent, decompress_latent
from osdiff.runtime.noise import gaussian_noise
from osdiff.runtime.profiling import NO_TRACE, Trace

# Default bound on decoded image size: a stream asks for a size before anything proves it
# genuine, so the decoder refuses absurd ones instead of allocating for them.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


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
    """reference_tables: the entropy tables the original implementation's raw stream format is
    coded with. "original" (default): derived as the original derives them on this CPU, so that
    its streams from a machine like this one decode; "canonical": the portable ones .osd
    streams always use (docs/entropy-tables.md)."""

    def __init__(self, backend: Backend, max_pixels: int = DEFAULT_MAX_PIXELS, reference_tables: str = "original") -> None:
        if reference_tables not in ("original", "canonical"):
            raise ValueError(f"reference_tables must be 'original' or 'canonical', not {reference_tables!r}")
        self.backend = backend
        self.models = backend.models
        self.cfg = backend.models.config
        self.max_pixels = max_pixels
        self.reference_tables = reference_tables

    @property
    def reference_models(self) -> EntropyModels:
        return self.models.original if self.reference_tables == "original" else self.models

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.cfg.pad_multiple
        return -(-height // m) * m, -(-width // m) * m

    # --- encode ----------------------------------------------------------------------------

    def compress(self, image: np.ndarray, seed: int = 0, trace: Trace = NO_TRACE) -> bytes:
        return self.compress_batch([image], [seed], trace)[0]

    def compress_batch(self, images: list[np.ndarray], seeds: list[int] | None = None,
                       trace: Trace = NO_TRACE) -> list[bytes]:
        """Images of one size: the VAE encoder and G_a run on the batch, the entropy coding
        per image (each image is its own stream)."""
        seeds = seeds if seeds is not None else [0] * len(images)
        out = []
        for image, seed, coded in zip(images, seeds, self.encode_latents(images, trace)):
            height, width = image.shape[:2]
            stream = OsdStream(height, width, seed, self.models.weights_id[:ID_BYTES], self.models.tables_id[:ID_BYTES],
                               coded.z_string, coded.y_string)
            stream.check = symbol_check(stream.header(), coded.symbols)
            out.append(stream.to_bytes())
        return out

    def compress_reference(self, image: np.ndarray, trace: Trace = NO_TRACE) -> bytes:
        """The original implementation's stream format (see decompress_reference)."""
        (coded,) = self.encode_latents([image], trace, self.reference_models)
        return write_reference(coded.z_shape, coded.y_string, coded.z_string)

    def encode_latents(self, images: list[np.ndarray], trace: Trace = NO_TRACE,
                       models: EntropyModels | None = None) -> list[CodedLatent]:
        if len({im.shape for im in images}) != 1:
            raise ValueError("a batch needs images of one size")
        x = torch.cat([image_to_tensor(im) for im in images])
        hp, wp = self.padded_size(*x.shape[2:])
        if hp * wp > self.max_pixels:
            raise ValueError(f"image of {x.shape[2]}x{x.shape[3]} exceeds the {self.max_pixels}-pixel limit")
        x = torch.nn.functional.pad(x, (0, wp - x.shape[3], 0, hp - x.shape[2]))  # zeros, bottom/right
        run = self.backend.run
        with trace("upload"):
            x = x.to(self.backend.device)
        with trace("vae_encoder"):
            (y0,) = run("vae_encoder", x)
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
        if len({(s.height, s.width) for s in streams}) != 1:
            raise ValueError("a batch needs streams of one image size")
        return streams

    def _decompress(self, streams: list[OsdStream], trace: Trace) -> Tensor:
        f = self.cfg.pad_multiple
        hp, wp = self.padded_size(streams[0].height, streams[0].width)
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
        return self.decode_image(torch.cat(y_hats), [s.seed for s in streams], size, trace)

    def decompress_reference(self, data: bytes, height: int, width: int, seed: int = 0, trace: Trace = NO_TRACE) -> np.ndarray:
        """The original implementation's stream format, which stores no image size (the user
        gives it), no seed and no check value (a desynchronized decode cannot be detected),
        read with the `reference_tables` chosen at construction."""
        return tensor_to_image(self.decompress_reference_tensor(data, height, width, seed, trace))

    def decompress_reference_tensor(self, data: bytes, height: int, width: int, seed: int = 0,
                                    trace: Trace = NO_TRACE, x_T: Tensor | None = None) -> Tensor:
        z_shape, y_string, z_string = read_reference(data)
        hp, wp = self._check_size(height, width)
        f = self.cfg.pad_multiple
        if z_shape != (hp // f, wp // f):
            raise StreamError(f"the stream's z shape {z_shape} does not fit a {height}x{width} image")
        y_hat = self._decode_latent(CodedLatent(z_string, y_string, z_shape, []), trace, self.reference_models)
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
                     x_T: Tensor | None = None) -> Tensor:
        """y_hat (B images) -> B x 3 x H x W float32 in [0, 1], cropped, on the CPU. seed: one
        per image; x_T: the noise, when not drawn from the seeds (golden-data checks give the
        reference's own)."""
        b, _, h, w = y_hat.shape
        with trace("noise"):
            if x_T is None:
                seeds = [seed] * b if isinstance(seed, int) else seed
                # the latent y_c that G_s makes is twice y's resolution
                shape = (1, self.cfg.vae.embed_dim, 2 * h, 2 * w)
                x_T = torch.from_numpy(np.concatenate([gaussian_noise(s, shape) for s in seeds]))
            x_T = x_T.to(self.backend.device)
        decode_tail = getattr(self.backend, "decode_tail", None)
        if decode_tail is not None:  # the backend runs the three stages as one CUDA graph
            with trace("synthesis+denoiser+vae_decoder"):
                image = decode_tail(y_hat, x_T)
        else:
            run = self.backend.run
            with trace("synthesis"):
                (y_c,) = run("synthesis", y_hat)
            with trace("denoiser"):
                (y_r,) = run("denoiser", y_c, x_T)
            with trace("vae_decoder"):
                (image,) = run("vae_decoder", y_r)
        with trace("download"):
            return image[:, :, : size[0], : size[1]].float().cpu()
