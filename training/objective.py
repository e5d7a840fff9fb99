"""The OSDiff training objective (paper section II, eqs. 8-14; the original `OSDiff.p_losses`,
`LFGCM.forward` and `GuidanceModel`), on the engine's own stage modules.

Generator turn, for images x:

    y0    = E_SD(x)                                     frozen SD VAE encoder, posterior mode
    y, z  = G_a(y0), h_a(y)
    rate  = R(y) + R(z)   from the likelihoods of y + U(-.5,.5) and z + U(-.5,.5), in bits per
                          image pixel (eq. 10)
    y_hat = round(y - mean) + mean, z_hat likewise around the medians, straight-through, the
            checkerboard/slice contexts computed exactly as the coder does (runtime/latent_codec)
    y_c   = G_s(y_hat)                                  the control hint
    y_T   = sqrt(abar_999) y0 + sqrt(1 - abar_999) n    forward diffusion to t = 999
            (or y_T = n, as at inference, with TrainSettings.pure_noise; t is the config's)
    y_r   = (y_T - sqrt(1 - abar_999) eps(y_T, y_c)) / sqrt(abar_999)        one step, eq. 8

    L_diff    = mean (y0 - y_r)^2                       eq. 9
    L_rate    = rate                                    eq. 10
    L_feature = mean (y0 - y_c)^2                       eq. 11
    L_G       = mean softplus(-D(y_r^t)) = -E_t log D(y_r^t),  y_r^t = q(y_r, t, n'), t ~ U{0..999}
    L         = L_diff + lambda * L_rate + 2 L_feature + 0.01 L_G          eq. 12-13

Discriminator turn (eq. 14), on the same y_r (detached) and the same t and n':
    L_D = mean softplus(D(y_r^t)) + mean softplus(-D(y0^t)) = -log(1 - D(y_r^t)) - log D(y0^t)

Where the released code differs from the paper, the paper is followed and the difference is
noted: its generator turn evaluates D under no_grad (L_G then trains nothing) with an
undefined t1; here L_G's gradient flows through the frozen D into y_r, at a fresh random t.
Its y_hat is rounded straight-through (not noisy) for G_s and the contexts, its rate uses noise;
that is kept, since it is what makes y_hat in training equal y_hat in the coder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.config import DiffusionConfig, ModelConfig
from osdiff.export.checkpoint import EB, STAGE_PREFIXES, split_by_stage, to_checkpoint_key
from osdiff.export.model import build_stages
from osdiff.export.models.lfgcm import EntropyParameters, squeeze_anchor, squeeze_nonanchor, unsqueeze_anchor, unsqueeze_nonanchor
from osdiff.export.models.text import TextEncoder, empty_prompt_tokens
from osdiff.export.models.unet import CDDM, Denoiser
from osdiff.training.discriminator import GuidanceModel
from osdiff.training.rate import FactorizedPrior, add_noise, bits, gaussian_likelihood, ste_round

GUIDANCE = "guidance_model."

# the paper's weights (eq. 12-13): L_diff 1, L_rate lambda, L_feature 2, L_G 0.01
FEATURE_WEIGHT = 2.0
GENERATOR_WEIGHT = 0.01


def schedule(d: DiffusionConfig) -> Tensor:
    """alphas_cumprod (T,), float64: ldm's "linear" schedule (squares of a linspace of roots)."""
    betas = torch.linspace(d.linear_start**0.5, d.linear_end**0.5, d.timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def q_sample(y0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion: sqrt(abar_t) y0 + sqrt(1 - abar_t) noise, per batch element."""
    abar = alphas_cumprod.to(y0.device)[t].to(y0.dtype).view(-1, 1, 1, 1)
    return abar.sqrt() * y0 + (1 - abar).sqrt() * noise


@dataclass
class LatentCoding:
    """What the LFGCM does to y0 in training. Likelihoods: per element, y then z."""

    y_hat: Tensor
    y_c: Tensor
    likelihoods: tuple[Tensor, Tensor]  # of the noisy values: the training rate
    q_likelihoods: tuple[Tensor, Tensor]  # of the rounded values: what the coder spends


@dataclass
class GeneratorOutput:
    y0: Tensor
    coding: LatentCoding
    y_r: Tensor
    losses: dict[str, Tensor]  # diff, rate, feature, generator, total; and q_rate (bpp, logged)


class OSDiffTraining(nn.Module):
    """Every network of OSDiff with its training-time forward passes.

    stages: the engine's stage modules (export/model.py build_stages, text encoder included);
    prior: the trainable z density; guidance_model: the discriminator. `trainable` names what
    the generator optimizer updates: the paper's set (LFGCM, control module) plus, with
    train_unet=True, the UNet (for models without a pretrained one: the built-in demo model).
    """

    def __init__(self, cfg: ModelConfig, train_unet: bool = False):
        super().__init__()
        self.config = cfg
        self.train_unet = train_unet
        self.stages = nn.ModuleDict(build_stages(cfg, with_text=True))
        self.prior = FactorizedPrior(cfg.lfgcm.N, tail_mass=cfg.entropy.tail_mass)
        self.guidance_model = GuidanceModel(cfg.guidance)
        self.register_buffer("alphas_cumprod", schedule(cfg.diffusion), persistent=False)
        _init_text_encoder(self.stages["text_encoder"])
        _zero_init_control_outputs(self.denoiser.control)

    # --- parts ----------------------------------------------------------------------------

    @property
    def denoiser(self) -> Denoiser:
        d = self.stages["denoiser"]
        assert isinstance(d, Denoiser)
        return d

    @property
    def entropy_parameters(self) -> EntropyParameters:
        ep = self.stages["entropy_parameters"]
        assert isinstance(ep, EntropyParameters)
        return ep

    def generator_parameters(self) -> list[nn.Parameter]:
        """Updated by the generator optimizer: G_a, h_a, h_s, entropy parameters, G_s, the
        factorized density (not its quantiles), the control module (and the UNet if trained)."""
        params = [p for name in ("analysis", "hyper_synthesis", "entropy_parameters", "synthesis")
                  for p in self.stages[name].parameters()]
        params += [p for n, p in self.prior.named_parameters() if n != "quantiles"]
        params += list(self.denoiser.control.parameters())
        if self.train_unet:
            params += list(self.denoiser.unet.parameters())
        return params

    def aux_parameters(self) -> list[nn.Parameter]:
        return [self.prior.quantiles]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.guidance_model.parameters())

    def frozen_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that no optimizer touches, by name."""
        trained = {id(p) for p in self.generator_parameters() + self.aux_parameters() + self.discriminator_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) not in trained}

    def set_requires_grad(self) -> None:
        frozen = {id(p) for p in self.frozen_parameters().values()}
        for p in self.parameters():
            p.requires_grad_(id(p) not in frozen)

    @torch.no_grad()
    def refresh_context(self) -> None:
        """The empty-prompt text context, as the loader computes it (export/model.py)."""
        text = self.stages["text_encoder"]
        tokens = empty_prompt_tokens(self.config.text.context_length).to(self.denoiser.context.device)
        self.denoiser.context.copy_(text(tokens))

    # --- forward passes -------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """y0 = E_SD(x): images B x 3 x H x W in [0, 1] -> B x 4 x H/f x W/f (frozen VAE)."""
        with torch.no_grad():
            return self.stages["vae_encoder"](x)

    def code_latent(self, y0: Tensor, generator: torch.Generator | None = None) -> LatentCoding:
        """The LFGCM in training (the original LFGCM.forward, on the coder's own contexts)."""
        cfg, ep = self.config, self.entropy_parameters
        y, z = self.stages["analysis"](y0)
        z_lik = self.prior.likelihood(add_noise(z, generator))
        z_hat = self.prior.quantize(z)
        z_lik_q = self.prior.likelihood(z_hat)
        hyper = self.stages["hyper_synthesis"](z_hat)
        y_hat_slices: list[Tensor] = []
        liks, liks_q = [], []
        for k, (lo, hi) in enumerate(cfg.lfgcm.slice_ranges):
            y_k = y[:, lo:hi]
            prev = torch.cat(y_hat_slices, dim=1) if k else None
            scales, means, channel_ctx = ep.anchor(k, hyper, prev)
            values = squeeze_anchor(y_k)
            anchor_hat = unsqueeze_anchor(ste_round(values - means) + means)
            liks.append(gaussian_likelihood(add_noise(values, generator), scales, means, cfg.entropy.scale_min))
            liks_q.append(gaussian_likelihood(torch.round(values - means) + means, scales, means, cfg.entropy.scale_min))
            scales, means = ep.nonanchor(k, anchor_hat, hyper, channel_ctx)
            values = squeeze_nonanchor(y_k)
            liks.append(gaussian_likelihood(add_noise(values, generator), scales, means, cfg.entropy.scale_min))
            liks_q.append(gaussian_likelihood(torch.round(values - means) + means, scales, means, cfg.entropy.scale_min))
            y_hat_slices.append(anchor_hat + unsqueeze_nonanchor(ste_round(values - means) + means))
        y_hat = torch.cat(y_hat_slices, dim=1)
        y_c = self.stages["synthesis"](y_hat)
        y_lik = torch.cat([v.flatten(1) for v in liks], dim=1)
        y_lik_q = torch.cat([v.flatten(1) for v in liks_q], dim=1)
        return LatentCoding(y_hat, y_c, (y_lik, z_lik), (y_lik_q, z_lik_q))

    def one_step(self, y0: Tensor, y_c: Tensor, noise: Tensor, pure_noise: bool = False) -> Tensor:
        """y_r: the denoiser stage (UNet + control, eq. 8) on y_T = q(y0, t, noise) at the
        config's one timestep t (999 in the paper), or on y_T = noise, as at inference, when
        pure_noise (the built-in model's choice: see training/builtin.py)."""
        den = self.denoiser
        if pure_noise:
            return den(y_c, noise)
        t = torch.full((y0.shape[0],), den.timestep, dtype=torch.long, device=y0.device)
        return den(y_c, q_sample(y0, t, noise, self.alphas_cumprod))

    def diffuse_pair(self, y_r: Tensor, y0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(y_r^t, y0^t, t): both forward-diffused with the same random t and noise."""
        b = y0.shape[0]
        t = torch.randint(0, self.config.diffusion.timesteps, (b,), generator=generator, device=y0.device)
        noise = torch.randn(y0.shape, generator=generator, device=y0.device, dtype=y0.dtype)
        return q_sample(y_r, t, noise, self.alphas_cumprod), q_sample(y0, t, noise, self.alphas_cumprod), t

    def discriminate(self, y_t: Tensor, t: Tensor) -> Tensor:
        context = self.denoiser.context.expand(y_t.shape[0], -1, -1)
        return self.guidance_model(y_t, t, context)

    def generator_step(self, x: Tensor, rate_weight: float, generator: torch.Generator | None = None,
                       y0: Tensor | None = None, pure_noise: bool = False) -> GeneratorOutput:
        """The generator turn's forward pass and losses for images x (B x 3 x H x W in [0, 1]);
        y0 may be given instead of being encoded from x (tests); pure_noise: see one_step."""
        y0 = self.encode(x) if y0 is None else y0
        coding = self.code_latent(y0, generator)
        noise = torch.randn(y0.shape, generator=generator, device=y0.device, dtype=y0.dtype)
        y_r = self.one_step(y0, coding.y_c, noise, pure_noise)
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        y_r_t, _, t = self.diffuse_pair(y_r, y0, generator)
        losses = {
            "diff": diffusion_loss(y0, y_r),
            "rate": rate_loss(coding.likelihoods, pixels),
            "feature": feature_loss(y0, coding.y_c),
            "generator": generator_loss(self.discriminate(y_r_t, t)),
        }
        losses["total"] = (losses["diff"] + rate_weight * losses["rate"] + FEATURE_WEIGHT * losses["feature"]
                           + GENERATOR_WEIGHT * losses["generator"])
        with torch.no_grad():
            losses["q_rate"] = rate_loss(coding.q_likelihoods, pixels)
        return GeneratorOutput(y0, coding, y_r, losses)

    def discriminator_step(self, y_r: Tensor, y0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """L_D (eq. 14) on a generated y_r (detached here) and the real y0."""
        y_r_t, y0_t, t = self.diffuse_pair(y_r.detach(), y0.detach(), generator)
        return discriminator_loss(self.discriminate(y_r_t, t), self.discriminate(y0_t, t))

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_state_dict(self, with_guidance: bool = True) -> dict[str, Tensor]:
        """The OSDiff Lightning checkpoint's keys (SD parts included), as export/checkpoint.py
        reads them: stage keys under their prefixes, the density under
        `preprocess_model.entropy_bottleneck.` (compressai >= 1.2.5 names), the discriminator
        under `guidance_model.`."""
        out: dict[str, Tensor] = {}
        for stage, module in self.stages.items():
            for name, t in module.state_dict().items():
                out[to_checkpoint_key(stage, name)] = t.detach().clone()
        for name, t in self.prior.state_dict().items():
            out[EB + name] = t.detach().clone()
        if with_guidance:
            for name, t in self.guidance_model.state_dict().items():
                out[GUIDANCE + name] = t.detach().clone()
        return out

    def load_checkpoint_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Inverse of checkpoint_state_dict, through the loader's key accounting (every key
        checked, both compressai spellings accepted). A checkpoint without discriminator keys
        starts f_d from the UNet's encoder (as the original does from SD)."""
        parts = split_by_stage(sd, self.config)
        for stage, module in self.stages.items():
            module.load_state_dict({k: v.float() for k, v in parts[stage].items()}, strict=True)
        self.prior.load_state_dict({k: v.float() for k, v in parts["entropy_bottleneck"].items()}, strict=True)
        guidance = {k[len(GUIDANCE):]: v.float() for k, v in sd.items() if k.startswith(GUIDANCE)}
        if guidance:
            self.guidance_model.load_state_dict(guidance, strict=True)
        else:
            self.guidance_model.init_from_unet(self.denoiser.unet)
        self.refresh_context()

    def load_sd(self, sd: dict[str, Tensor]) -> None:
        """Start from a Stable Diffusion checkpoint alone (no OSDiff parts yet): the SD stages
        load from it, the control module starts from the UNet's weights (tiled to its narrower
        widths, as the original's sync_control_weights_from_base_checkpoint), its output convs
        at zero, the LFGCM and the density at their initialization, f_d from the UNet."""
        for stage in ("vae_encoder", "vae_decoder", "text_encoder"):
            _load_prefixed(self.stages[stage], sd, STAGE_PREFIXES[stage])
        _load_prefixed(self.denoiser.unet, sd, [("model.diffusion_model.", "")])
        _tile_into(self.denoiser.control.control_model, self.denoiser.unet)
        _zero_init_control_outputs(self.denoiser.control)
        self.guidance_model.init_from_unet(self.denoiser.unet)
        self.refresh_context()


# ---------------------------------------------------------------------------------------------
# The losses, each a direct transcription of its equation
# ---------------------------------------------------------------------------------------------


def diffusion_loss(y0: Tensor, y_r: Tensor) -> Tensor:
    """L_diff = ||y0 - y_r||^2, averaged over elements (eq. 9; ldm's l2 get_loss, mean)."""
    return F.mse_loss(y_r, y0)


def feature_loss(y0: Tensor, y_c: Tensor) -> Tensor:
    """L_feature = ||y0 - y_c||^2, averaged over elements (eq. 11)."""
    return F.mse_loss(y_c, y0)


def rate_loss(likelihoods: tuple[Tensor, ...], pixels: int) -> Tensor:
    """L_rate = (-log2 p(y_hat) - log2 p(z_hat)) / pixels: bits per image pixel (eq. 10)."""
    return sum((bits(lik) for lik in likelihoods), torch.zeros(())) / pixels


def generator_loss(fake_logits: Tensor) -> Tensor:
    """L_G = -E_t log D(y_r^t) = mean softplus(-logit) (eq. 13)."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    """L_D = -E_t log(1 - D(y_r^t)) - E_t log D(y0^t) (eq. 14)."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


# ---------------------------------------------------------------------------------------------
# Initialization helpers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_text_encoder(text: nn.Module) -> None:
    """open_clip's initialization of the parameters the inference module leaves empty (it
    is always loaded from a checkpoint there)."""
    assert isinstance(text, TextEncoder)
    nn.init.normal_(text.token_embedding.weight, std=0.02)
    nn.init.normal_(text.positional_embedding, std=0.01)
    for block in text.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=block.attn.in_proj_weight.shape[1] ** -0.5)
        nn.init.zeros_(block.attn.in_proj_bias)


def _zero_init_control_outputs(cddm: CDDM) -> None:
    """ControlNet's zero convolutions: the control module starts by adding nothing."""
    with torch.no_grad():
        for conv in [*cddm.enc_zero_convs_out, cddm.middle_block_out, *cddm.dec_zero_convs_out]:
            conv[0].weight.zero_()
            conv[0].bias.zero_()


def _load_prefixed(module: nn.Module, sd: dict[str, Tensor], prefixes: list[tuple[str, str]]) -> None:
    own = module.state_dict()
    found = {}
    for ckpt_prefix, module_prefix in prefixes:
        for k, v in sd.items():
            if k.startswith(ckpt_prefix):
                name = module_prefix + k[len(ckpt_prefix):]
                if name in own:
                    found[name] = v.float()
    missing = sorted(set(own) - set(found))
    if missing:
        from osdiff.export.checkpoint import CheckpointError

        raise CheckpointError(f"the SD checkpoint lacks {len(missing)} key(s) of {type(module).__name__}, e.g. {missing[:3]}")
    module.load_state_dict(found, strict=True)


@torch.no_grad()
def _tile_into(control: nn.Module, unet: nn.Module) -> None:
    """Each control parameter from the UNet parameter of the same name, repeated twice along
    dim 0 (1-d) or dim 1 (more) and cut to the control's shape (the original's rule)."""
    base = unet.state_dict()
    for name, p in control.state_dict().items():
        w = base.get(name)
        if w is None:
            continue
        if w.shape == p.shape:
            p.copy_(w)
        elif w.dim() == 1:
            p.copy_(torch.cat([w, w], 0)[: p.shape[0]])
        else:
            tiled = torch.cat([w, w], 1)[: p.shape[0], : p.shape[1]]
            if tiled.shape == p.shape:
                p.copy_(tiled)
