"""The OSDiff training objective on the tiny reference model: what each turn updates, each loss
against its formula, the training rate against real streams, and checkpoints through the
normal loader, export and codec."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osdiff.export.model import OSDiffModel
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec, image_to_tensor
from osdiff.runtime.latent_codec import compress_latent
from osdiff.training.loop import Trainer, TrainSettings
from osdiff.training.objective import OSDiffTraining, q_sample
from osdiff.training.rate import FactorizedPrior, gaussian_likelihood


@pytest.fixture()
def training_model(tiny_config, tiny_state_dict) -> OSDiffTraining:
    model = OSDiffTraining(tiny_config)
    model.load_checkpoint_state_dict(tiny_state_dict)
    return model


def batch(seed: int = 0, n: int = 2, size: int = 128) -> torch.Tensor:
    """Smooth random images (a photo-like spectrum), B x 3 x size x size in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 16, size // 16, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ---------------------------------------------------------------------------------------------
# What each loss and each turn trains
# ---------------------------------------------------------------------------------------------


def test_each_turn_changes_exactly_its_trainable_parameters(training_model):
    m = training_model
    trainer = Trainer(m, TrainSettings(lr=1e-3, d_lr=1e-3, seed=1))
    generator, aux, disc = (names(m, f()) for f in (m.generator_parameters, m.aux_parameters, m.discriminator_parameters))
    frozen = set(m.frozen_parameters())
    # the paper's split: SD VAE, UNet and text tower frozen; LFGCM, density, control, D trained
    assert all(n.startswith(("stages.vae_", "stages.text_encoder.", "stages.denoiser.unet.")) for n in frozen)
    assert any(n.startswith("stages.denoiser.unet.") for n in frozen)
    assert any(n.startswith("stages.denoiser.control.") for n in generator)
    assert disc == {n for n, _ in m.named_parameters() if n.startswith("guidance_model.")}
    assert aux == {"prior.quantiles"}

    before = snapshot(m)
    trainer.step(batch())
    after_step = changed(m, before)
    # every trained parameter moved, no frozen one did (bit-identical)
    assert after_step == generator | aux | disc
    assert not after_step & frozen


@pytest.mark.parametrize("loss", ["diff", "rate", "feature", "generator", "discriminator", "aux"])
def test_each_loss_reaches_only_parameters_its_optimizer_updates(training_model, loss):
    m = training_model
    m.set_requires_grad()
    g = torch.Generator().manual_seed(3)
    if loss == "aux":
        value, allowed = m.prior.aux_loss(), names(m, m.aux_parameters())
    elif loss == "discriminator":
        out = m.generator_step(batch(), 1.0, g)
        m.zero_grad(set_to_none=True)
        value, allowed = m.discriminator_step(out.y_r, out.y0, g), names(m, m.discriminator_parameters())
    else:
        m.guidance_model.requires_grad_(False)  # the generator turn's rule
        value, allowed = m.generator_step(batch(), 1.0, g).losses[loss], names(m, m.generator_parameters())
    value.backward()
    reached = {n for n, p in m.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert reached, f"L_{loss} trains nothing"
    assert reached <= allowed, f"L_{loss} reaches {sorted(reached - allowed)[:5]}"
    expected = {
        "diff": ("stages.denoiser.control.", "stages.synthesis.", "stages.analysis.encoder."),
        "feature": ("stages.synthesis.", "stages.analysis.encoder."),
        "rate": ("stages.analysis.hyper_enc.", "stages.hyper_synthesis.", "stages.entropy_parameters.", "prior.matrices."),
        "generator": ("stages.denoiser.control.", "stages.synthesis."),
        "discriminator": ("guidance_model.Discriminator.", "guidance_model.DMLP."),
        "aux": ("prior.quantiles",),
    }[loss]
    for prefix in expected:
        assert any(n.startswith(prefix) for n in reached), f"L_{loss} does not reach {prefix}"


# ---------------------------------------------------------------------------------------------
# Each loss against a direct computation of its formula
# ---------------------------------------------------------------------------------------------


def test_losses_match_their_formulas(training_model, tiny_config):
    m = training_model.eval()
    x = batch(seed=5)
    with torch.no_grad():
        out = m.generator_step(x, rate_weight=2.0, generator=torch.Generator().manual_seed(9))
    y0, y_c, y_r, L = out.y0, out.coding.y_c, out.y_r, out.losses
    pixels = x.shape[0] * x.shape[2] * x.shape[3]

    # y0 is the frozen VAE encoder's posterior mode
    assert torch.equal(y0, m.stages["vae_encoder"](x))
    d = y0.double()
    assert math.isclose(float(L["diff"]), float(((d - y_r.double()) ** 2).sum() / d.numel()), rel_tol=1e-5)
    assert math.isclose(float(L["feature"]), float(((d - y_c.double()) ** 2).sum() / d.numel()), rel_tol=1e-5)
    bits = sum(-np.log2(lik.double().numpy()).sum() for lik in out.coding.likelihoods)
    assert math.isclose(float(L["rate"]), bits / pixels, rel_tol=1e-5)
    total = float(L["diff"]) + 2.0 * float(L["rate"]) + 2.0 * float(L["feature"]) + 0.01 * float(L["generator"])
    assert math.isclose(float(L["total"]), total, rel_tol=1e-5)

    # eq. 8 from the float64 schedule: y_r = (y_T - sqrt(1 - abar) eps) / sqrt(abar) at t = 999
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(2))
    abar = float(torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[999])
    y_T = math.sqrt(abar) * y0 + math.sqrt(1 - abar) * noise
    den = m.denoiser
    with torch.no_grad():
        eps = den.eps(y_T, y_c, torch.tensor([999]), den.context.expand(2, -1, -1))
        y_r_direct = (y_T.double() - math.sqrt(1 - abar) * eps.double()) / math.sqrt(abar)
        assert torch.allclose(m.one_step(y0, y_c, noise).double(), y_r_direct, rtol=0, atol=1e-4 * float(y_r_direct.abs().max()))
        # pure_noise (the built-in recipe's): y_T is the noise itself, as at inference
        eps = den.eps(noise, y_c, torch.tensor([999]), den.context.expand(2, -1, -1))
        y_r_direct = (noise.double() - math.sqrt(1 - abar) * eps.double()) / math.sqrt(abar)
        y_r_pure = m.one_step(y0, y_c, noise, pure_noise=True).double()
        assert torch.allclose(y_r_pure, y_r_direct, rtol=0, atol=1e-4 * float(y_r_direct.abs().max()))
        assert not torch.allclose(y_r_pure, m.one_step(y0, y_c, noise).double())

    # L_G = -log D(y_r^t), L_D = -log(1 - D(y_r^t)) - log D(y0^t), D = sigmoid(logit)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        fake = m.discriminate(q_sample(y_r, t, noise, m.alphas_cumprod), t).double()
        real = m.discriminate(q_sample(y0, t, noise, m.alphas_cumprod), t).double()
    from osdiff.training.objective import discriminator_loss, generator_loss

    assert math.isclose(float(generator_loss(fake)), float(-torch.log(torch.sigmoid(fake)).mean()), rel_tol=1e-9)
    direct = -torch.log(1 - torch.sigmoid(fake)).mean() - torch.log(torch.sigmoid(real)).mean()
    assert math.isclose(float(discriminator_loss(fake, real)), float(direct), rel_tol=1e-9)


def test_gaussian_and_factorized_likelihoods_match_their_densities():
    g = torch.Generator().manual_seed(0)
    y, mu = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g)
    s = torch.rand(1000, generator=g) * 4 + 0.01  # some under the 0.11 bound
    normal = torch.distributions.Normal(mu.double(), s.double().clamp_min(0.11))
    direct = (normal.cdf(y.double() + 0.5) - normal.cdf(y.double() - 0.5)).clamp_min(1e-9)
    assert torch.allclose(gaussian_likelihood(y, s, mu).double(), direct, rtol=1e-4, atol=1e-7)

    prior = FactorizedPrior(4)
    z = torch.randn(1, 4, 3, 5, generator=g) * 5
    c = lambda v: torch.sigmoid(prior.logits_cumulative(v.permute(1, 0, 2, 3).reshape(4, 1, -1)))  # noqa: E731
    with torch.no_grad():
        direct = (c(z + 0.5) - c(z - 0.5)).reshape(4, 1, 3, 5).permute(1, 0, 2, 3)
        assert torch.allclose(prior.likelihood(z), direct.clamp_min(1e-9), rtol=1e-4, atol=1e-7)


def test_training_y_hat_is_the_coders(training_model, tiny_config, tiny_image):
    """The straight-through y_hat of training equals what the codec transmits, element for
    element (same contexts, same rounding). The rate of the rounded latents against the real
    streams is checked on the trained built-in model (test_builtin_model.py): this tiny
    model's weights are random, and its many out-of-support symbols go through the coder's
    escape codes, which cost far less than their ~30-bit likelihood floor."""
    m = training_model.eval()
    x = image_to_tensor(tiny_image)
    with torch.no_grad():
        y0 = m.encode(x)
        coding = m.code_latent(y0)
        backend = TorchBackend(OSDiffModel.from_state_dict(m.checkpoint_state_dict(), tiny_config))
        y, z = backend.run("analysis", y0)
        mm = backend.models
        _, y_hat = compress_latent(backend, tiny_config, mm.entropy_bottleneck, mm.gaussian, y, z)
    assert torch.allclose(coding.y_hat, y_hat, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_loads_exports_and_round_trips_a_stream(training_model, tiny_config, tiny_image, tmp_path):
    from osdiff.export.onnx_export import export_onnx
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    trainer = Trainer(training_model, TrainSettings(lr=1e-3, d_lr=1e-3))
    trainer.step(batch())
    path = tmp_path / "osdiff.ckpt"
    trainer.save(path)

    model = OSDiffModel.load(None, path, tiny_config)  # the normal loader: every key accounted for
    state = training_model.checkpoint_state_dict()
    assert torch.equal(model.stages["synthesis"].decoder.g_s4.weight, state["preprocess_model.decoder.g_s4.weight"])
    codec = Codec(TorchBackend(model))
    data = codec.compress(tiny_image)
    assert codec.decompress(data).shape == tiny_image.shape

    export_onnx(model, tmp_path / "onnx", fp16=False)
    ort = Codec(OnnxRuntimeBackend(tmp_path / "onnx"))
    assert ort.compress(tiny_image) == data  # the exported graphs code the same symbols
    assert float(np.abs(ort.decompress(data).astype(int) - codec.decompress(data).astype(int)).max()) <= 2


def test_resume_continues_exactly_where_it_stopped(tiny_config, tiny_state_dict, tmp_path):
    def fresh() -> Trainer:
        m = OSDiffTraining(tiny_config)
        m.load_checkpoint_state_dict(tiny_state_dict)
        return Trainer(m, TrainSettings(lr=1e-3, d_lr=1e-3, seed=4))

    straight = fresh()
    for i in range(2):
        straight.step(batch(seed=i))
    first = fresh()
    first.step(batch(seed=0))
    first.save(tmp_path / "a.ckpt")
    resumed = Trainer.resume(tmp_path / "a.ckpt")
    assert resumed.global_step == 1 and len(resumed.history) == 1
    resumed.step(batch(seed=1))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_training_state_is_refused_for_resume(tiny_dir):
    from osdiff.export.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not an osdiff training checkpoint"):
        Trainer.resume(tiny_dir / "osdiff_tiny.ckpt")


def test_starting_from_sd_alone(tiny_config, tiny_dir):
    """--sd without an OSDiff checkpoint: SD's stages load, the control module starts tiled
    from the UNet with zero output convs (adds nothing yet), f_d from the UNet where it fits."""
    sd = torch.load(tiny_dir / "sd21_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    m = OSDiffTraining(tiny_config)
    m.load_sd(sd)
    unet, ctrl = m.denoiser.unet, m.denoiser.control
    assert torch.equal(unet.input_blocks[1][0].in_layers[2].weight, sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"])
    w = sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    c = ctrl.control_model.input_blocks[1][0].in_layers[2].weight
    assert torch.equal(c, torch.cat([w, w], 1)[: c.shape[0], : c.shape[1]])
    assert all(not conv[0].weight.detach().any() for conv in ctrl.enc_zero_convs_out)
    x, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    with torch.no_grad():  # zero convs: the control module changes nothing yet
        t = torch.tensor([999])
        ctx = m.denoiser.context
        assert torch.equal(m.denoiser.eps(noise, x, t, ctx), unet(noise, t, ctx))


def image_folder(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        pixels = (batch(seed=i, n=1, size=192)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    return images


def test_training_on_one_cpu_thread(tiny_dir, tmp_path):
    """One CPU thread (--threads 1, or a one-core machine's default), where torch's oneDNN
    convolution backward corrupts the heap (training/loop.py, safe_cpu_convolutions). In a
    process of its own, so that a crash fails this test rather than aborting the suite."""
    cmd = [sys.executable, "-m", "osdiff.cli", "train", "--threads", "1", "--steps", "2",
           "--images", str(image_folder(tmp_path)), "--sd", str(tiny_dir / "sd21_tiny.ckpt"),
           "--config", str(tiny_dir / "config.json"), "--crop", "128", "--batch", "2", "-o", str(tmp_path / "o.ckpt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "step 2/2" in done.stdout


def test_train_command_trains_resumes_and_exports(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from osdiff.cli import main

    images = image_folder(tmp_path)
    ckpt = tmp_path / "osdiff.ckpt"
    common = ["--images", str(images), "--config", str(tiny_dir / "config.json"), "--crop", "128", "--batch", "2",
              "-o", str(ckpt)]
    run = lambda *a: CliRunner().invoke(main, ["train", *a], catch_exceptions=False)  # noqa: E731
    result = run("--sd", str(tiny_dir / "sd21_tiny.ckpt"), "--steps", "1", *common)
    assert result.exit_code == 0, result.output
    assert "step 1/1" in result.output and ckpt.exists()
    result = run("--resume", str(ckpt), "--steps", "2", *common)
    assert result.exit_code == 0, result.output
    assert "resuming at step 1" in result.output and "at step 2" in result.output
    result = CliRunner().invoke(main, ["export", "--osdiff", str(ckpt), "--sd", str(tiny_dir / "sd21_tiny.ckpt"),
                                       "--config", str(tiny_dir / "config.json"), "-o", str(tmp_path / "onnx"),
                                       "--only", "synthesis", "--no-fp16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "fp32" / "synthesis.onnx").exists()


def test_random_crops_are_seeded_and_draw_every_image_equally():
    """Each crop's image is drawn uniformly, not by area: a photo 16 times larger than another
    still gives about half the crops."""
    from osdiff.training.data import RandomCrops

    large, small = np.zeros((400, 400, 3), np.uint8), np.full((100, 100, 3), 255, np.uint8)
    crops = RandomCrops([large, small], crop=32, batch=200, seed=3)
    x = next(crops)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    from_small = float((x.mean(dim=(1, 2, 3)) == 1.0).float().mean())
    assert 0.4 <= from_small <= 0.6, from_small
    assert torch.equal(x, next(RandomCrops([large, small], crop=32, batch=200, seed=3)))


def test_bundled_photos_load_and_unknown_names_name_the_packages():
    pytest.importorskip("skimage", reason="the built-in model's photographs come from scikit-image's wheel")
    from osdiff.training.data import HELD_OUT_PHOTOS, TRAIN_PHOTOS, bundled_photo

    assert not set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS)
    for name in TRAIN_PHOTOS + HELD_OUT_PHOTOS:
        image = bundled_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 96
        assert (image[..., 0] != image[..., 1]).any(), f"{name} is grey"  # colour photographs only
    with pytest.raises(FileNotFoundError, match="nope.png.*scikit-image or matplotlib"):
        bundled_photo("nope.png")


def test_random_crops_follow_their_weights():
    from osdiff.training.data import RandomCrops

    black, white = np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)
    x = next(RandomCrops([black, white], crop=32, batch=400, seed=5, weights=[0.8, 0.2]))
    from_white = float((x.mean(dim=(1, 2, 3)) == 1.0).float().mean())
    assert 0.13 <= from_white <= 0.27, from_white


def test_colour_jitter_rotates_hues_keeps_greys_and_is_seeded():
    """Greys stay grey (only their brightness changes); a green patch comes back in other hues
    across seeds; the same generator state gives the same pixels."""
    from osdiff.training.data import colour_jitter

    grey = np.full((8, 8, 3), 100, np.uint8)
    out = colour_jitter(grey, np.random.default_rng(0))
    assert np.abs(out.astype(int) - out[..., :1].astype(int)).max() <= 1 and 70 <= out.mean() <= 140
    green = np.zeros((8, 8, 3), np.uint8)
    green[..., 1] = 160
    dominant = {int(np.argmax(colour_jitter(green, np.random.default_rng(s))[0, 0])) for s in range(40)}
    assert dominant == {0, 1, 2}, dominant  # red, green and blue each come out on top for some seed
    assert np.array_equal(colour_jitter(green, np.random.default_rng(7)), colour_jitter(green, np.random.default_rng(7)))


def test_wallpapers_are_checked_and_a_missing_folder_says_how_to_fetch(tmp_path, monkeypatch):
    from osdiff.training import wallpapers

    monkeypatch.setenv("OSDIFF_PHOTOS", str(tmp_path))
    assert not wallpapers.available()
    with pytest.raises(FileNotFoundError, match="make photos"):
        wallpapers.load("Path")
    (tmp_path / "Path.jpg").write_bytes(b"not the picture")
    with pytest.raises(ValueError, match="SHA-256"):
        wallpapers.load("Path")
    monkeypatch.setattr(wallpapers.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get not found"):
        wallpapers.fetch(tmp_path / "new", log=lambda s: None)


def test_built_in_training_never_sees_a_held_out_photo(monkeypatch):
    """By name and by pixels: no training picture is one of the held-out set (the wallpapers
    included when fetched; without them the recipe says so and trains on the wheels' photos)."""
    pytest.importorskip("skimage", reason="the built-in model's photographs come from scikit-image's wheel")
    from osdiff.training import wallpapers
    from osdiff.training.data import HELD_OUT_SET, builtin_training_images

    said: list[str] = []
    names, images, photo = builtin_training_images(said.append)
    assert not set(names) & set(HELD_OUT_SET) and len(HELD_OUT_SET) >= 12
    if not wallpapers.available():
        assert "make photos" in said[0]
        pytest.skip(f"held-out pixels not compared: {wallpapers.missing_message()}")
    assert len(names) == 43 and sum(photo) == 10 and "wallpaper packages" in said[0]
    digests = {hashlib.sha256(im.tobytes()).hexdigest() for im in images}
    from osdiff.training.data import held_out_photo

    assert not digests & {hashlib.sha256(held_out_photo(n).tobytes()).hexdigest() for n in HELD_OUT_SET}
