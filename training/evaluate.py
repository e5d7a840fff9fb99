"""Rate-distortion of a model on whole images, with real streams: the bits are the length of
what the engine's codec writes (runtime/codec.py), next to the rate the training objective
estimates for the same image (the entropy models' likelihoods of the rounded latents), and
next to JPEG and WebP (Pillow) at the same bits per pixel; with the mean colour shift (issue 29:
greens decoded brown is a shift of the channel means a PSNR figure does not name).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from osdiff.files import psnr


@dataclass
class Row:
    name: str
    height: int
    width: int
    bpp: float  # real stream bytes x 8 / pixels (the .osd container's overhead included)
    estimated_bpp: float  # from the likelihoods of the rounded latents, padded image, same pixels
    psnr: float
    ms_ssim: float
    jpeg_quality: int
    jpeg_bpp: float
    jpeg_psnr: float
    jpeg_ms_ssim: float
    webp_quality: int = -1
    webp_bpp: float = float("nan")
    webp_psnr: float = float("nan")
    webp_ms_ssim: float = float("nan")
    # mean of the decoded image minus mean of the original, per channel (R, G, B), 8-bit levels
    shift_r: float = float("nan")
    shift_g: float = float("nan")
    shift_b: float = float("nan")
    # where the quality goes, on the same padded image and real rounded latents: the frozen
    # autoencoder alone, D(E(x)), and the control hint decoded without the denoiser, D(G_s(y_hat))
    vae_psnr: float = float("nan")
    hint_psnr: float = float("nan")
    perceptual: dict = field(default_factory=dict)  # LPIPS / DISTS, where their weights exist

    @property
    def colour_shift(self) -> float:
        """Mean absolute per-channel shift of the channel means, 8-bit levels."""
        return (abs(self.shift_r) + abs(self.shift_g) + abs(self.shift_b)) / 3

    def to_dict(self) -> dict:
        return asdict(self) | {"colour_shift": self.colour_shift}


def channel_shift(original: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-channel mean of decoded minus mean of original (H x W x 3 uint8 each): 3 floats, levels."""
    return decoded.reshape(-1, 3).astype(np.float64).mean(0) - original.reshape(-1, 3).astype(np.float64).mean(0)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM (5 scales, Gaussian window 11, pytorch-msssim) of two H x W x 3 uint8 images;
    both sides must be at least 161 pixels."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    ta, tb = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].double() / 255 for x in (a, b))
    return float(_ms_ssim(ta, tb, data_range=1.0))


def jpeg_at_bpp(image: np.ndarray, target_bpp: float, fmt: str = "JPEG") -> tuple[int, float, np.ndarray]:
    """The Pillow quality whose size is closest to target_bpp without exceeding it (the lowest
    quality if even that exceeds it). JPEG: quality 1..95, 4:2:0, optimized Huffman tables;
    WEBP: lossy, quality 0..100, method 6. -> (quality, bpp, decoded image)."""
    pixels = image.shape[0] * image.shape[1]
    options = {"JPEG": {"optimize": True}, "WEBP": {"method": 6}}[fmt]

    def encode(q: int) -> tuple[float, bytes]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, quality=q, **options)
        return len(buf.getvalue()) * 8 / pixels, buf.getvalue()

    lo, hi = (1, 95) if fmt == "JPEG" else (0, 100)
    best = (lo, *encode(lo))
    while lo <= hi:  # size grows with quality (monotone in practice)
        mid = (lo + hi) // 2
        b, data = encode(mid)
        if b <= target_bpp:
            best, lo = (mid, b, data), mid + 1
        else:
            hi = mid - 1
    q, b, data = best
    return q, b, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _padded(image: np.ndarray, pad_multiple: int) -> torch.Tensor:
    """The image as the codec's .osd encoder feeds it: 1 x 3 x H' x W' in [0, 1], padded at the
    bottom and right to multiples of pad_multiple as runtime/codec.py pads (OSD_PADDING)."""
    from osdiff.runtime.codec import image_to_tensor, pad_image

    return image_to_tensor(pad_image(image, pad_multiple))


def estimated_bpp(training_model, image: np.ndarray, pad_multiple: int) -> float:
    """The rate the training objective assigns to the rounded latents of `image` (padded as the
    codec pads it), per pixel of the unpadded image."""
    from osdiff.training.objective import rate_loss

    h, w = image.shape[:2]
    x = _padded(image, pad_multiple)
    training_model.eval()
    with torch.no_grad():
        coding = training_model.code_latent(training_model.encode(x))
        return float(rate_loss(coding.q_likelihoods, h * w))


def ceilings(training_model, image: np.ndarray, pad_multiple: int) -> tuple[float, float]:
    """(PSNR of D(E(x)), PSNR of D(G_s(y_hat))) for `image`, padded as the codec pads it
    and cropped back: what the autoencoder alone and the LFGCM without the denoiser allow, the
    ceilings of the whole decoder's PSNR."""
    from osdiff.runtime.codec import tensor_to_image

    h, w = image.shape[:2]
    x = _padded(image, pad_multiple)
    decoder = training_model.stages["vae_decoder"]
    training_model.eval()
    with torch.no_grad():
        y0 = training_model.encode(x)
        hint = training_model.code_latent(y0).y_c
        pixels = [tensor_to_image(decoder(y)[:, :, :h, :w]) for y in (y0, hint)]  # as the codec converts
    return psnr(image, pixels[0]), psnr(image, pixels[1])


def evaluate(codec, training_model, images: dict[str, np.ndarray],
             perceptual: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
             decoded_out: dict[str, np.ndarray] | None = None) -> list[Row]:
    """codec: runtime.codec.Codec of the model; training_model: the same weights in an
    OSDiffTraining (for the estimated rate), or None; perceptual: more metrics of (original,
    decoded); decoded_out: filled with the decoded images when given."""
    rows = []
    for name, image in images.items():
        data = codec.compress(image)
        decoded = codec.decompress(data)
        h, w = image.shape[:2]
        bpp = len(data) * 8 / (h * w)
        est = estimated_bpp(training_model, image, codec.cfg.pad_multiple) if training_model is not None else float("nan")
        q, jb, jpeg = jpeg_at_bpp(image, bpp)
        wq, wb, webp = jpeg_at_bpp(image, bpp, "WEBP")
        vae, hint = ceilings(training_model, image, codec.cfg.pad_multiple) if training_model is not None else (
            float("nan"), float("nan"))
        shift = channel_shift(image, decoded)
        rows.append(Row(name, h, w, bpp, est, psnr(image, decoded), ms_ssim(image, decoded), q, jb,
                        psnr(image, jpeg), ms_ssim(image, jpeg), wq, wb, psnr(image, webp), ms_ssim(image, webp),
                        *map(float, shift), vae_psnr=vae, hint_psnr=hint,
                        perceptual=perceptual(image, decoded) if perceptual else {}))
        if decoded_out is not None:
            decoded_out[name] = decoded
    return rows


MEAN_FIELDS = ("bpp", "estimated_bpp", "psnr", "ms_ssim", "colour_shift", "jpeg_bpp", "jpeg_psnr", "jpeg_ms_ssim",
               "webp_bpp", "webp_psnr", "webp_ms_ssim", "vae_psnr", "hint_psnr")


def means(rows: list[Row]) -> dict[str, float]:
    return {k: float(np.mean([getattr(r, k) for r in rows])) for k in MEAN_FIELDS}


def table(rows: list[Row]) -> str:
    """One line per image and their mean: bpp, PSNR (dB), MS-SSIM and mean colour shift (levels)
    of the model, JPEG and WebP at the same bpp, and the ceilings."""
    head = (f"{'image':<18}{'size':>9}{'bpp':>7}{'PSNR':>7}{'MS-SSIM':>8}{'shift':>7}{'JPEG bpp':>9}{'PSNR':>7}"
            f"{'MS-SSIM':>8}{'WebP bpp':>9}{'PSNR':>7}{'MS-SSIM':>8}{'VAE':>7}{'hint':>7}")

    def line(name: str, size: str, v: dict) -> str:
        return (f"{name:<18}{size:>9}{v['bpp']:>7.3f}{v['psnr']:>7.2f}{v['ms_ssim']:>8.4f}{v['colour_shift']:>7.2f}"
                f"{v['jpeg_bpp']:>9.3f}{v['jpeg_psnr']:>7.2f}{v['jpeg_ms_ssim']:>8.4f}{v['webp_bpp']:>9.3f}"
                f"{v['webp_psnr']:>7.2f}{v['webp_ms_ssim']:>8.4f}{v['vae_psnr']:>7.2f}{v['hint_psnr']:>7.2f}")

    lines = [head] + [line(r.name, f"{r.width}x{r.height}", r.to_dict()) for r in rows]
    return "\n".join(lines + [line("mean", "", means(rows))])
