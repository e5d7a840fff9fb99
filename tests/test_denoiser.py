"""The UNet, the control module (CDDM) and the one-step denoiser against the reference goldens."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REFERENCE, assert_close_rel, sub_state_dict
from osdiff.config import ModelConfig
from osdiff.export.models.unet import (
    Denoiser,
    discriminator_key_shapes,
    find_denominator,
    one_step_coefficients,
    timestep_embedding,
)

PREFIXES = (("model.diffusion_model.", "unet."), ("control_model.", "control."))
T = torch.tensor([999])


@pytest.fixture(scope="module")
def denoiser(tiny_config, tiny_state_dict, golden) -> Denoiser:
    c = tiny_config
    model = Denoiser(c.unet, c.control, c.diffusion, c.text.context_length)
    sd = {}
    for ckpt_prefix, prefix in PREFIXES:
        sd.update(sub_state_dict(tiny_state_dict, ckpt_prefix, prefix))
    model.load_state_dict(sd, strict=True)
    model.context.copy_(golden["context"])
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trace_run(denoiser, golden) -> dict[str, torch.Tensor]:
    """One eps() on the golden inputs with every block output captured by forward hooks."""
    out: dict[str, torch.Tensor] = {}
    unet, cddm = denoiser.unet, denoiser.control
    ctrl = cddm.control_model

    def grab(module, name):
        return module.register_forward_hook(lambda m, args, o: out.__setitem__(name, o.clone()))

    hooks = [grab(unet.time_embed, "base_time_embed"), grab(ctrl.time_embed, "ctrl_time_embed"),
             grab(unet.middle_block, "base_middle_block"), grab(ctrl.middle_block, "ctrl_middle_block"),
             grab(cddm.middle_block_out, "zero_conv_mid")]
    for i in range(len(unet.input_blocks)):
        hooks += [grab(unet.input_blocks[i], f"base_input_block{i:02d}"),
                  grab(ctrl.input_blocks[i], f"ctrl_input_block{i:02d}"),
                  grab(cddm.enc_zero_convs_out[i], f"zero_conv_enc{i:02d}")]
    for j in range(len(unet.output_blocks)):
        hooks += [grab(unet.output_blocks[j], f"base_output_block{j:02d}"),
                  grab(cddm.dec_zero_convs_out[j], f"zero_conv_dec{j:02d}")]
    try:
        with torch.no_grad():
            out["eps"] = denoiser.eps(golden["x_T"], golden["c_latent"], T, golden["context"])
    finally:
        for h in hooks:
            h.remove()
    return out


# --- construction -----------------------------------------------------------------------------


def test_find_denominator():
    assert find_denominator(6, 32) == 6 and find_denominator(12, 32) == 12  # early return
    assert find_denominator(6, 4) == 3 and find_denominator(12, 4) == 4  # search
    assert find_denominator(320, 32) == 32 and find_denominator(64, 16) == 16 and find_denominator(7, 4) == 1


def test_tiny_derived_facts(tiny_dir, denoiser):
    """Heads, head sizes, GroupNorm groups/eps and zero-conv channels as config.json lists."""
    derived = json.loads((tiny_dir / "config.json").read_text())["derived"]
    modules = dict(denoiser.named_modules())

    def module(ckpt_name):
        for ckpt_prefix, prefix in PREFIXES:
            if ckpt_name.startswith(ckpt_prefix):
                return modules[prefix + ckpt_name[len(ckpt_prefix):]]
        raise KeyError(ckpt_name)

    transformers = derived["unet_spatial_transformers"] + derived["control_spatial_transformers"]
    for t in transformers:
        m = module(t["module"])
        attn = m.transformer_blocks[0].attn1
        assert attn.heads == t["heads"], t["module"]
        assert attn.to_q.out_features // attn.heads == t["dim_head"], t["module"]
        assert (m.norm.num_groups, m.norm.eps) == (t["norm_groups"], t["norm_eps"]), t["module"]
        assert m.transformer_blocks[0].attn2.to_k.in_features == t["cross_attn_context_dim"]
    n_attn = sum(1 for m in denoiser.modules() if type(m).__name__ == "SpatialTransformer")
    assert n_attn == len(transformers)
    for g in derived["control_groupnorms"]:
        m = module(g["module"])
        assert (m.num_channels, m.num_groups, m.eps) == (g["channels"], g["groups"], g["eps"]), g["module"]

    zc = derived["control_zero_convs"]
    cddm = denoiser.control
    channels = lambda seq: [seq[0].in_channels, seq[0].out_channels]  # noqa: E731
    assert [channels(z) for z in cddm.enc_zero_convs_out] == zc["enc"]
    assert channels(cddm.middle_block_out) == zc["mid"]
    assert [channels(z) for z in cddm.dec_zero_convs_out] == zc["dec"]
    assert cddm.scale_list.tolist() == derived["control_scale_list"]


def _manifest_keys() -> dict[str, tuple[int, ...]]:
    path = REFERENCE / "manifest_full.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return {k: tuple(v["shape"]) for k, v in json.loads(path.read_text())["keys"].items()}


def test_full_size_keys_match_manifest():
    cfg = ModelConfig.full()
    with torch.device("meta"):
        model = Denoiser(cfg.unet, cfg.control, cfg.diffusion, cfg.text.context_length)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    manifest = _manifest_keys()
    expected = {}
    for ckpt_prefix, prefix in PREFIXES:
        expected.update({prefix + k[len(ckpt_prefix):]: s for k, s in manifest.items() if k.startswith(ckpt_prefix)})
    assert len(expected) == 686 + 349
    assert ours == expected
    assert "context" not in ours and tuple(model.context.shape) == (1, 77, 1024)
    assert sum(p.numel() for p in model.unet.parameters()) == 865_910_724


def test_discriminator_keys_match_manifest():
    prefix = "guidance_model.Discriminator."
    expected = {k[len(prefix):]: s for k, s in _manifest_keys().items() if k.startswith(prefix)}
    assert len(expected) == 298
    assert discriminator_key_shapes(ModelConfig.full().guidance) == expected


def test_tiny_discriminator_keys_match_checkpoint(tiny_config, tiny_state_dict):
    prefix = "guidance_model.Discriminator."
    expected = {k[len(prefix):]: tuple(v.shape) for k, v in tiny_state_dict.items() if k.startswith(prefix)}
    assert expected and discriminator_key_shapes(tiny_config.guidance) == expected


# --- numerics on the tiny golden set -------------------------------------------------------------


def test_timestep_embedding(tiny_config, cddm_trace):
    ours = timestep_embedding(T, tiny_config.unet.model_channels)
    assert_close_rel(ours, cddm_trace["timestep_embedding"], 1e-5, "timestep_embedding")


def test_cddm_trace(trace_run, cddm_trace):
    names = [k for k in cddm_trace if k != "timestep_embedding"]
    assert len(names) == 2 + 3 * 12 + 3 + 2 * 12 + 1
    missing = sorted(set(names) - set(trace_run))
    assert not missing, missing
    for name in names:
        assert_close_rel(trace_run[name], cddm_trace[name], 1e-5, name)


def test_eps_and_unet_only(denoiser, golden):
    with torch.no_grad():
        eps = denoiser.eps(golden["x_T"], golden["c_latent"], T, golden["context"])
        plain = denoiser.unet(golden["x_T"], T, golden["context"])
    assert_close_rel(eps, golden["eps"], 1e-5, "eps")
    assert_close_rel(plain, golden["eps_unet_only"], 1e-5, "eps_unet_only")
    # the control path matters: a test that ignored it could not pass both
    assert (eps - plain).std() > 0.5 * eps.std()


def test_one_step_coefficients(tiny_config, golden):
    c1, c2 = one_step_coefficients(tiny_config.diffusion)
    assert c1 == golden["sampler_sqrt_recip_alphas_cumprod"].item() == 14.648813247680664
    assert c2 == golden["sampler_sqrt_recipm1_alphas_cumprod"].item() == 14.614641189575195
    # eq. 8 in float32 on the golden eps reproduces the golden y_r bit for bit
    y_r = c1 * golden["x_T"] - c2 * golden["eps"]
    assert torch.equal(y_r, golden["y_r"])


def test_forward_y_r(denoiser, golden):
    with torch.no_grad():
        y_r = denoiser(golden["c_latent"], golden["x_T"])
    assert_close_rel(y_r, golden["y_r"], 1e-5, "y_r")


def test_batch_of_two(denoiser, golden):
    x = torch.cat([golden["x_T"], torch.flip(golden["x_T"], dims=[3])])
    hint = torch.cat([golden["c_latent"], torch.flip(golden["c_latent"], dims=[2])])
    with torch.no_grad():
        both = denoiser(hint, x)
        second = denoiser(hint[1:], x[1:])
        # forward broadcasts one timestep over the batch; one per item must give the same eps
        eps = denoiser.eps(x, hint, torch.tensor([999, 999]), golden["context"].expand(2, -1, -1))
    assert both.shape == (2, 4, 16, 24)
    assert_close_rel(both[:1], golden["y_r"], 1e-5, "y_r[0]")
    assert_close_rel(both[1:], second, 1e-5, "y_r[1]")
    assert_close_rel(denoiser.c1 * x - denoiser.c2 * eps, both, 1e-5, "y_r from eps")


# --- full size --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_denoiser() -> Denoiser:
    """Full-size architecture with random weights scaled for O(1) activations (3.6 GB fp32)."""
    cfg = ModelConfig.full()
    with torch.device("meta"):
        model = Denoiser(cfg.unet, cfg.control, cfg.diffusion, cfg.text.context_length)
    model.to_empty(device="cpu").requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            fan_in = math.prod(p.shape[1:])
            p.normal_(0.0, 0.5 / math.sqrt(fan_in), generator=gen)
        elif name.endswith("weight"):  # norms
            p.fill_(1.0)
        else:
            p.zero_()
    model.control.scale_list.fill_(1.0)
    model.context.normal_(generator=gen)
    return model


@pytest.mark.slow
def test_full_size_smoke(full_denoiser):
    gen = torch.Generator().manual_seed(1)
    y_c, x_T = torch.randn(2, 1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        y_r = full_denoiser(y_c, x_T)
    assert y_r.shape == (1, 4, 8, 8)
    assert torch.isfinite(y_r).all()
    # eps = (c1 x_T - y_r) / c2 must be a real, non-constant prediction
    eps = (full_denoiser.c1 * x_T - y_r) / full_denoiser.c2
    assert 1e-3 < eps.std() < 1e3
