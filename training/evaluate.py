"""Rate-distortion of a model on whole images, with real streams: the bits are the length of
what the engine's codec writes (runtime/codec.py), next to the rate the training objective
estimates for the same image (the entropy models' likelihoods of the rounded latents), and
next to JPEG (Pillow) at the same bits per pixel.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

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
    # where the quality goes, on the same padded image and real rounded latents: the frozen
    # autoencoder alone, D(E(x)), and the control hint decoded without the denoiser, D(G_s(y_hat))
    vae_psnr: float = float("nan")
    hint_psnr: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM (5 scales, Gaussian window 11, pytorch-msssim) of two H x W x 3 uint8 images;
    both sides must be at least 161 pixels."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    ta, tb = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].double() / 255 for x in (a, b))
    return float(_ms_ssim(ta, tb, data_range=1.0))


def jpeg_at_bpp(image: np.ndarray, target_bpp: float) -> tuple[int, float, np.ndarray]:
    """The Pillow JPEG quality (1..95, 4:2:0, optimized Huffman tables) whose size is closest
    to target_bpp without exceeding it (quality 1 if even that exceeds it). -> (quality, bpp,
    decoded image)."""
    pixels = image.shape[0] * image.shape[1]

    def encode(q: int) -> tuple[float, bytes]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=q, optimize=True)
        return len(buf.getvalue()) * 8 / pixels, buf.getvalue()

    lo, hi = 1, 95
    best = (1, *encode(1))
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


def evaluate(codec, training_model, images: dict[str, np.ndarray]) -> list[Row]:
    """codec: runtime.codec.Codec of the model; training_model: the same weights in an
    OSDiffTraining (for the estimated rate), or None."""
    rows = []
    for name, image in images.items():
        data = codec.compress(image)
        decoded = codec.decompress(data)
        h, w = image.shape[:2]
        bpp = len(data) * 8 / (h * w)
        est = estimated_bpp(training_model, image, codec.cfg.pad_multiple) if training_model is not None else float("nan")
        q, jb, jpeg = jpeg_at_bpp(image, bpp)
        vae, hint = ceilings(training_model, image, codec.cfg.pad_multiple) if training_model is not None else (
            float("nan"), float("nan"))
        rows.append(Row(name, h, w, bpp, est, psnr(image, decoded), ms_ssim(image, decoded), q, jb,
                        psnr(image, jpeg), ms_ssim(image, jpeg), vae, hint))
    return rows


def table(rows: list[Row]) -> str:
    head = (f"{'image':<14}{'size':>10}{'bpp':>8}{'est.bpp':>9}{'PSNR':>8}{'MS-SSIM':>9}"
            f"{'JPEG q':>8}{'JPEG bpp':>10}{'JPEG PSNR':>11}{'JPEG MS-SSIM':>14}{'VAE PSNR':>10}{'hint PSNR':>11}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.name:<14}{f'{r.width}x{r.height}':>10}{r.bpp:>8.3f}{r.estimated_bpp:>9.3f}{r.psnr:>8.2f}"
                     f"{r.ms_ssim:>9.4f}{r.jpeg_quality:>8}{r.jpeg_bpp:>10.3f}{r.jpeg_psnr:>11.2f}{r.jpeg_ms_ssim:>14.4f}"
                     f"{r.vae_psnr:>10.2f}{r.hint_psnr:>11.2f}")
    mean = lambda f: float(np.mean([getattr(r, f) for r in rows]))  # noqa: E731
    lines.append(f"{'mean':<14}{'':>10}{mean('bpp'):>8.3f}{mean('estimated_bpp'):>9.3f}{mean('psnr'):>8.2f}"
                 f"{mean('ms_ssim'):>9.4f}{'':>8}{mean('jpeg_bpp'):>10.3f}{mean('jpeg_psnr'):>11.2f}"
                 f"{mean('jpeg_ms_ssim'):>14.4f}{mean('vae_psnr'):>10.2f}{mean('hint_psnr'):>11.2f}")
    return "\n".join(lines)
