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

from osdiff.runtime.backends.base import Backend
from osdiff.runtime.bitstream import FINGERPRINT_BYTES, OsdStream, StreamError, read_reference, symbol_check, write_reference
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
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def tensor_to_image(x: Tensor) -> np.ndarray:
    """1 x 3 x H x W in [0, 1] -> H x W x 3 uint8; truncation, not rounding, as the reference."""
    return (x[0].permute(1, 2, 0).float().cpu() * 255).clamp(0, 255).to(torch.uint8).numpy()


class Codec:
    def __init__(self, backend: Backend, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.backend = backend
        self.models = backend.models
        self.cfg = backend.models.config
        self.max_pixels = max_pixels

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.cfg.pad_multiple
        return -(-height // m) * m, -(-width // m) * m

    # --- encode ----------------------------------------------------------------------------

    def compress(self, image: np.ndarray, seed: int = 0, trace: Trace = NO_TRACE) -> bytes:
        height, width = image.shape[:2]
        coded = self.encode_latent(image, trace)
        stream = OsdStream(height, width, seed, self.models.fingerprint[:FINGERPRINT_BYTES], coded.z_string, coded.y_string)
        stream.check = symbol_check(stream.header(), coded.symbols)
        return stream.to_bytes()

    def compress_reference(self, image: np.ndarray, trace: Trace = NO_TRACE) -> bytes:
        """The original implementation's stream format (see decompress_reference)."""
        coded = self.encode_latent(image, trace)
        return write_reference(coded.z_shape, coded.y_string, coded.z_string)

    def encode_latent(self, image: np.ndarray, trace: Trace = NO_TRACE) -> CodedLatent:
        x = image_to_tensor(image)
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
        m = self.models
        return compress_latent(self.backend, self.cfg, m.entropy_bottleneck, m.gaussian, y, z, trace)[0]

    # --- decode ----------------------------------------------------------------------------

    def decompress(self, data: bytes, trace: Trace = NO_TRACE) -> np.ndarray:
        """.osd bytes -> H x W x 3 uint8."""
        return tensor_to_image(self.decompress_tensor(data, trace))

    def decompress_tensor(self, data: bytes, trace: Trace = NO_TRACE) -> Tensor:
        """.osd bytes -> 1 x 3 x H x W float32 in [0, 1], before the uint8 conversion."""
        with trace("parse"):
            stream = OsdStream.from_bytes(data)
        if stream.fingerprint != self.models.fingerprint[:FINGERPRINT_BYTES]:
            raise StreamError(
                f"the stream was made with other model weights (fingerprint {stream.fingerprint.hex()}, "
                f"this model {self.models.fingerprint[:FINGERPRINT_BYTES].hex()})"
            )
        hp, wp = self._check_size(stream.height, stream.width)
        f = self.cfg.pad_multiple
        coded = CodedLatent(stream.z_string, stream.y_string, (hp // f, wp // f), [])
        y_hat = self._decode_latent(coded, trace)
        if symbol_check(stream.header(), coded.symbols) != stream.check:
            raise StreamError(
                "check value mismatch: the stream is corrupt, or this decoder derived entropy-model "
                "indexes differently from the encoder (another backend or precision)"
            )
        return self.decode_image(y_hat, stream.seed, (stream.height, stream.width), trace)

    def decompress_reference(self, data: bytes, height: int, width: int, seed: int = 0, trace: Trace = NO_TRACE) -> np.ndarray:
        """The original implementation's stream format, which stores no image size (the user
        gives it), no seed and no check value (a desynchronized decode cannot be detected)."""
        z_shape, y_string, z_string = read_reference(data)
        hp, wp = self._check_size(height, width)
        f = self.cfg.pad_multiple
        if z_shape != (hp // f, wp // f):
            raise StreamError(f"the stream's z shape {z_shape} does not fit a {height}x{width} image")
        y_hat = self._decode_latent(CodedLatent(z_string, y_string, z_shape, []), trace)
        return tensor_to_image(self.decode_image(y_hat, seed, (height, width), trace))

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        hp, wp = self.padded_size(height, width)
        if hp * wp > self.max_pixels:
            raise StreamError(f"stream asks for a {height}x{width} image, over the {self.max_pixels}-pixel limit")
        return hp, wp

    def _decode_latent(self, coded: CodedLatent, trace: Trace) -> Tensor:
        m = self.models
        try:
            return decompress_latent(self.backend, self.cfg, m.entropy_bottleneck, m.gaussian, coded, trace)
        except ValueError as e:
            if isinstance(e, StreamError):
                raise
            raise StreamError(f"the entropy-coded data is inconsistent with its header: {e}") from e

    def decode_image(self, y_hat: Tensor, seed: int, size: tuple[int, int], trace: Trace = NO_TRACE,
                     x_T: Tensor | None = None) -> Tensor:
        """y_hat -> 1 x 3 x H x W float32 in [0, 1], cropped, on the CPU. x_T: the noise, when
        not drawn from `seed` (golden-data checks give the reference's own)."""
        run = self.backend.run
        with trace("synthesis"):
            (y_c,) = run("synthesis", y_hat)
        with trace("noise"):
            if x_T is None:
                x_T = torch.from_numpy(gaussian_noise(seed, tuple(y_c.shape)).copy())
            x_T = x_T.to(self.backend.device)
        with trace("denoiser"):
            (y_r,) = run("denoiser", y_c, x_T)
        with trace("vae_decoder"):
            (image,) = run("vae_decoder", y_r)
        with trace("download"):
            return image[:, :, : size[0], : size[1]].float().cpu()
