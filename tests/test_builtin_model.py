"""The built-in demo model: the shipped weights are the ones the recipe made (SHA-256 pinned),
they load through the normal loader, and they compress a held-out photo into a picture a
person recognizes, at the rate the training objective estimates."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import numpy as np
import pytest
import torch

from conftest import REPO
from osdiff.builtin import WEIGHTS, load_builtin
from osdiff.files import psnr, read_image
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec

# sha-256 of osdiff/assets/demo_model.safetensors, as `osdiff train --builtin` wrote it
# (benchmarks/results/demo_model_training.json records the same)
SHA256 = "ecb656844adef3621731692a1c7d13489482161c28caadb5feb82975bdb5fe99"


def weights_bytes() -> bytes:
    return (resources.files("osdiff") / "assets" / WEIGHTS).read_bytes()


def test_shipped_weights_are_the_pinned_ones_and_small():
    data = weights_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256
    assert len(data) <= 10 * 1024 * 1024
    results = json.loads((REPO / "benchmarks" / "results" / "demo_model_training.json").read_text())
    assert results["sha256"] == SHA256


@pytest.fixture(scope="module")
def builtin_codec() -> Codec:
    return Codec(TorchBackend(load_builtin()))


def held_out_round_trip(codec: Codec) -> tuple[float, float]:
    """(bpp, PSNR) of the bundled demo photo, a crop of chelsea.png: held out of training."""
    image = read_image(resources.files("osdiff") / "assets" / "demo.png")
    data = codec.compress(image)
    return len(data) * 8 / (image.shape[0] * image.shape[1]), psnr(image, codec.decompress(data))


def test_builtin_model_decodes_a_held_out_photo_above_the_target(builtin_codec):
    bpp, value = held_out_round_trip(builtin_codec)
    assert bpp <= 0.6
    assert value >= 22.0


def test_builtin_model_reconstructs_a_held_out_photo(builtin_codec):
    """A floor just under what the shipped weights measured (28.57 dB at 0.267 bpp; the weights
    before issue 29: 27.14 dB at 0.384 bpp), far above the random-weight model (about 8 dB): a
    changed loader or pipeline that degrades the trained model fails here."""
    bpp, value = held_out_round_trip(builtin_codec)
    assert 0.23 <= bpp <= 0.30, bpp
    assert value >= 28.1


def test_training_rate_estimate_matches_the_real_stream(builtin_codec):
    """The likelihoods the objective trains on (rounded latents) predict the stream length."""
    from safetensors.torch import load_file

    from osdiff.config import ModelConfig
    from osdiff.training.evaluate import ceilings, estimated_bpp
    from osdiff.training.objective import OSDiffTraining

    image = read_image(resources.files("osdiff") / "assets" / "demo.png")
    with resources.as_file(resources.files("osdiff") / "assets" / WEIGHTS) as path:
        model = OSDiffTraining(ModelConfig.demo())
        model.load_checkpoint_state_dict(load_file(str(path)))
    estimated = estimated_bpp(model, image, builtin_codec.cfg.pad_multiple)
    real = len(builtin_codec.compress(image)) * 8 / (image.shape[0] * image.shape[1])
    assert abs(real - estimated) <= 0.05 * estimated + 0.005, (real, estimated)
    # the evaluation's ceilings: the trained autoencoder alone and the control hint decoded
    # without the denoiser (30.61 and 28.72 dB when the weights were made; random weights:
    # about 8 dB)
    vae, hint = ceilings(model, image, builtin_codec.cfg.pad_multiple)
    assert vae >= 30.1 and hint >= 28.2, (vae, hint)


@pytest.fixture(scope="module")
def held_out_rows(builtin_codec) -> dict[str, tuple[float, float, float, float]]:
    """name -> (bpp, PSNR, MS-SSIM, mean absolute channel-mean shift in levels) of every photo of
    the held-out set at full size (the wallpaper ones only when fetched: `make photos`)."""
    pytest.importorskip("skimage", reason="the held-out photographs ship with scikit-image")
    pytest.importorskip("pytorch_msssim", reason="MS-SSIM comes from pytorch-msssim (the eval extra)")
    from osdiff.training import wallpapers
    from osdiff.training.data import HELD_OUT_SET, held_out_photo
    from osdiff.training.evaluate import channel_shift, ms_ssim

    rows = {}
    for name in HELD_OUT_SET:
        if name in wallpapers.BY_NAME and not wallpapers.available():
            continue
        image = held_out_photo(name)
        data = builtin_codec.compress(image)
        out = builtin_codec.decompress(data)
        rows[name] = (len(data) * 8 / (image.shape[0] * image.shape[1]), psnr(image, out), ms_ssim(image, out),
                      float(np.abs(channel_shift(image, out)).mean()))
    return rows


def test_builtin_model_meets_the_target_on_the_held_out_photos(held_out_rows):
    """Issue 13's target, averaged over the first three held-out photos at full size: PSNR >= 22 dB
    and MS-SSIM >= 0.85 at <= 0.6 bpp; and no worse than the model before issue 29 measured
    there (0.444 bpp, 23.75 dB, MS-SSIM 0.884 with edge padding; the shipped weights: 0.232 bpp,
    26.98 dB, 0.913)."""
    from osdiff.training.data import HELD_OUT_PHOTOS

    bpp, value, similarity, _ = np.mean([held_out_rows[n] for n in HELD_OUT_PHOTOS], axis=0)
    assert bpp <= 0.6 and value >= 23.75 and similarity >= 0.884, held_out_rows


def test_builtin_model_meets_issue_29s_targets_on_the_held_out_set(held_out_rows):
    """Issue 29's targets on the twelve held-out photos (foliage, sky, water, skin, man-made; none
    seen in training), whole: mean PSNR >= 24 dB and MS-SSIM >= 0.90 at <= 0.5 bpp, mean absolute
    shift of the channel means <= 3 levels (the shipped weights: 0.206 bpp, 27.81 dB, 0.923, 1.98
    levels, at most 3.73 on one photo: benchmarks/results/demo_model_training.json). The
    weights before them: 18-23 dB on such photos, greens brown, shifts up to 38 levels."""
    from osdiff.training import wallpapers
    from osdiff.training.data import HELD_OUT_SET

    if len(held_out_rows) < len(HELD_OUT_SET):
        pytest.skip(f"the held-out set is incomplete: {wallpapers.missing_message()}")
    bpp, value, similarity, shift = np.mean(list(held_out_rows.values()), axis=0)
    assert bpp <= 0.5 and value >= 24.0 and similarity >= 0.90 and shift <= 3.0, held_out_rows
    assert max(r[3] for r in held_out_rows.values()) <= 4.5, held_out_rows  # no photo's colours off


@pytest.mark.slow
def test_builtin_recipe_runs_end_to_end(tmp_path):
    """The recipe's code path, shortened to a few steps (the real run: osdiff train --builtin)."""
    pytest.importorskip("skimage", reason="the built-in recipe trains on scikit-image's photographs")
    pytest.importorskip("pytorch_msssim", reason="the evaluation reports MS-SSIM")
    from osdiff.training.builtin import Recipe, report_builtin, train_builtin

    recipe = Recipe(vae_steps=2, vae_batch=2, tune_steps=2, tune_batch=1, tune_crop=96, steps=2, batch=2, crop=64,
                    large_steps=1, large_crop=96, warmup=1)
    torch.set_num_threads(2)
    weights = train_builtin(tmp_path, recipe, log=lambda s: None)
    results = report_builtin(tmp_path, tmp_path / "results", log=lambda s: None)
    assert weights.stat().st_size <= 10 * 1024 * 1024
    assert all((tmp_path / f).is_file() for f in ("vae.pt", "vae_tuned.pt", "osdiff.ckpt"))
    from osdiff.training import wallpapers
    from osdiff.training.data import HELD_OUT_SET

    assert len(results["held_out"]) == (len(HELD_OUT_SET) if wallpapers.available() else 4)
    assert all(np.isfinite(r["bpp"]) and np.isfinite(r["webp_psnr"]) and np.isfinite(r["colour_shift"])
               for r in results["held_out"])
    assert all(np.isfinite(r["vae_psnr"]) and np.isfinite(r["hint_psnr"]) for r in results["held_out"])
    assert results["demo"]["name"] == "demo.png" and set(results["perceptual_skipped"]) <= {"lpips-alex", "lpips-vgg", "dists"}
    assert all((tmp_path / "results" / f"demo_model_{f}").stat().st_size > 0 for f in ("loss_curves.png", "held_out.jpg"))
    again = train_builtin(tmp_path, recipe, log=lambda s: None)  # every stage done: nothing reruns
    assert again.read_bytes() == weights.read_bytes()
