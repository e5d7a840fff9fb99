"""SD 2.1 VAE stages: goldens of the tiny set, full-size key accounting, odd sizes, fp16, ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REFERENCE, assert_close_rel, sub_state_dict
from osdiff.config import ModelConfig
from osdiff.export.models.vae import VAEDecoder, VAEEncoder

# stage-module prefix -> checkpoint prefix (export/checkpoint.py, STAGE_PREFIXES)
ENCODER_PREFIXES = {"encoder.": "first_stage_model.encoder.", "quant_conv.": "first_stage_model.quant_conv."}
DECODER_PREFIXES = {"decoder.": "first_stage_model.decoder.", "post_quant_conv.": "first_stage_model.post_quant_conv."}


def _load(module: torch.nn.Module, sd: dict[str, torch.Tensor], prefixes: dict[str, str]) -> torch.nn.Module:
    weights = {}
    for ours, theirs in prefixes.items():
        weights.update(sub_state_dict(sd, theirs, ours))
    module.load_state_dict(weights, strict=True)
    return module.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def encoder(tiny_config, tiny_state_dict) -> VAEEncoder:
    return _load(VAEEncoder(tiny_config.vae, tiny_config.diffusion.scale_factor), tiny_state_dict, ENCODER_PREFIXES)


@pytest.fixture(scope="module")
def decoder(tiny_config, tiny_state_dict) -> VAEDecoder:
    return _load(VAEDecoder(tiny_config.vae, tiny_config.diffusion.scale_factor), tiny_state_dict, DECODER_PREFIXES)


def test_scale_constants_are_the_references_float32_values():
    with torch.device("meta"):
        enc, dec = VAEEncoder(ModelConfig.full().vae), VAEDecoder(ModelConfig.full().vae)
    assert enc.scale == float(np.float32(0.18215)) == 0.1821500062942505
    assert dec.inv_scale == 5.489980697631836


@torch.no_grad()
def test_encoder_golden(encoder, golden):
    image = golden["image"]
    assert_close_rel(encoder.moments(image), golden["vae_moments"], 1e-5, "vae_moments")
    assert_close_rel(encoder(image), golden["y0"], 1e-5, "y0")


@torch.no_grad()
def test_decoder_golden(decoder, golden):
    captured = {}
    conv = decoder.post_quant_conv
    hooks = [conv.register_forward_pre_hook(lambda m, i: captured.update(inp=i[0])),
             conv.register_forward_hook(lambda m, i, o: captured.update(out=o))]
    try:
        raw = decoder.decode_raw(golden["y_r"])
    finally:
        for hook in hooks:
            hook.remove()
    # the reference multiplies by float32(1/0.18215); dividing by 0.18215 differs in the last bit
    y_r = golden["y_r"]
    assert torch.equal(captured["inp"], y_r * torch.tensor(5.489980697631836))
    assert not torch.equal(y_r / 0.18215, y_r * torch.tensor(5.489980697631836))
    assert_close_rel(captured["out"], golden["vae_post_quant"], 1e-5, "vae_post_quant")
    assert_close_rel(raw, golden["decoded_raw"], 1e-5, "decoded_raw")
    # the golden decoded_raw leaves [-1,1] somewhere, so the clamp is exercised
    assert golden["decoded_raw"].abs().max() > 1
    assert_close_rel(decoder(golden["y_r"]), golden["decoded"], 1e-5, "decoded")


def _manifest_shapes(prefixes: dict[str, str]) -> dict[str, tuple[int, ...]]:
    keys = json.loads((REFERENCE / "manifest_full.json").read_text())["keys"]
    out = {}
    for key, entry in keys.items():
        for ours, theirs in prefixes.items():
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = tuple(entry["shape"])
    return out


@pytest.mark.parametrize(
    "cls, prefixes, n_params",
    [(VAEEncoder, ENCODER_PREFIXES, 34_163_664), (VAEDecoder, DECODER_PREFIXES, 49_490_199)],
    ids=["encoder", "decoder"],
)
def test_full_size_keys_match_manifest(cls, prefixes, n_params):
    if not (REFERENCE / "manifest_full.json").exists():
        pytest.skip("manifest_full.json not found")
    with torch.device("meta"):
        module = cls(ModelConfig.full().vae)
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert ours == _manifest_shapes(prefixes)
    assert sum(p.numel() for p in module.parameters()) == n_params


def test_stage_prefixes_cover_every_vae_key(tiny_state_dict):
    vae_keys = {k for k in tiny_state_dict if k.startswith("first_stage_model.")}
    theirs = tuple(ENCODER_PREFIXES.values()) + tuple(DECODER_PREFIXES.values())
    assert vae_keys and all(k.startswith(theirs) for k in vae_keys)


@torch.no_grad()
def test_non_square_size_not_a_multiple_of_64(tiny_config):
    # 72x40 -> latent 9x5: the right/bottom-padded downsampling meets odd sides (9 -> 5 -> 3)
    torch.manual_seed(0)
    enc, dec = VAEEncoder(tiny_config.vae).eval(), VAEDecoder(tiny_config.vae).eval()
    y0 = enc(torch.rand(1, 3, 72, 40))
    assert y0.shape == (1, 4, 9, 5)
    assert enc.moments(torch.rand(1, 3, 72, 40)).shape == (1, 8, 9, 5)
    image = dec(y0)
    assert image.shape == (1, 3, 72, 40)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    # batch elements are independent (GroupNorm and attention never mix them)
    pair = torch.rand(2, 3, 72, 40)
    assert_close_rel(enc(pair)[1:], enc(pair[1:]), 1e-5, "batch")


@torch.no_grad()
def test_half_precision_keeps_float32_islands(tiny_config, encoder, decoder, golden):
    # fp16 weights and activations, fp32 GroupNorm statistics and attention: close to fp32.
    # A 64x64 crop, because CPU fp16 convolutions are slow.
    image, y_r = golden["image"][..., :64, :64], golden["y_r"][..., :8, :8]
    enc = VAEEncoder(tiny_config.vae).eval()
    enc.load_state_dict(encoder.state_dict())
    y0 = enc.half()(image.half())
    assert y0.dtype == torch.float16
    assert_close_rel(y0.float(), encoder(image), 1e-2, "y0 fp16")

    dec = VAEDecoder(tiny_config.vae).eval()
    dec.load_state_dict(decoder.state_dict())
    raw = dec.half().decode_raw(y_r.half())
    assert raw.dtype == torch.float16
    assert_close_rel(raw.float(), decoder.decode_raw(y_r), 1e-2, "decoded_raw fp16")


@pytest.mark.slow
def test_decoder_exports_to_onnx_with_dynamic_size(decoder, golden, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    with torch.no_grad():
        program = torch.onnx.export(decoder, (golden["y_r"],), dynamo=True, input_names=["y_r"],
                                    output_names=["image"], dynamic_shapes=({2: Dim.AUTO, 3: Dim.AUTO},))
    program.save(str(tmp_path / "vae_decoder.onnx"))
    session = ort.InferenceSession(str(tmp_path / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])

    def run(y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"y_r": y.numpy()})[0])

    assert_close_rel(run(golden["y_r"]), golden["decoded"], 1e-5, "onnx decoded")
    other = torch.randn(1, 4, 9, 5)
    got = run(other)
    assert got.shape == (1, 3, 72, 40)
    with torch.no_grad():
        assert_close_rel(got, decoder(other), 1e-5, "onnx decoded 72x40")


def test_norm_groups_follow_the_config():
    """SD's VAE (full size, and the reference's tiny checkpoint) keeps ldm's 32 groups; the demo
    VAE has 8, so that each group holds several channels and keeps their means (issue 29); a
    config written before the field existed reads as 32."""
    from osdiff.export.models.vae import GroupNorm

    for cfg, groups in ((ModelConfig.full(), 32), (ModelConfig.demo(), 8)):
        norms = [m for m in VAEDecoder(cfg.vae).modules() if isinstance(m, GroupNorm)]
        assert norms and {m.num_groups for m in norms} == {groups}
    old = ModelConfig.demo().to_dict()
    del old["vae"]["norm_groups"]
    assert ModelConfig.from_dict(old).vae.norm_groups == 32
    assert ModelConfig.from_dict(ModelConfig.demo().to_dict()) == ModelConfig.demo()
