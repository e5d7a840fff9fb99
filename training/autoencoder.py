"""Training a VAE from scratch, for models that have no pretrained SD VAE (the built-in demo
model only: OSDiff itself keeps SD 2.1's VAE frozen).

ldm's AutoencoderKL objective without its perceptual and adversarial parts: reconstruction
(mean squared error of the image in [0, 1]) of a sample of the posterior, plus a small KL
term to N(0, 1), which keeps the latent smooth and the decoder tolerant of small latent
errors (those the one-step denoiser makes). Afterwards `normalize_latent` rescales the
latent so that y0 = mean * scale_factor has unit variance, as SD's scale factor does for SD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from osdiff.export.models.vae import VAEDecoder, VAEEncoder


def vae_losses(enc: VAEEncoder, dec: VAEDecoder, x: Tensor, kl_weight: float,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """x: B x 3 x H x W in [0, 1]. Returns rec (MSE), kl (per latent element), total."""
    mean, logvar = enc.moments(x).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    sample = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    rec = (dec.decode_raw(sample * enc.scale) + 1) / 2
    losses = {
        "rec": F.mse_loss(rec, x),
        "kl": 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean(),
    }
    losses["total"] = losses["rec"] + kl_weight * losses["kl"]
    return losses


@torch.no_grad()
def normalize_latent(enc: VAEEncoder, dec: VAEDecoder, x: Tensor) -> float:
    """Rescale the posterior mean by k = 1 / std(y0 on x) inside quant_conv, and undo it in
    post_quant_conv, so that the autoencoder computes the same images and y0 has unit
    standard deviation. Returns k."""
    k = 1.0 / float(enc(x).std())
    e = enc.embed_dim
    enc.quant_conv.weight[:e] *= k
    enc.quant_conv.bias[:e] *= k
    enc.quant_conv.bias[e:] += 2.0 * float(torch.log(torch.tensor(k)))  # the same relative posterior spread
    dec.post_quant_conv.weight /= k
    return k
