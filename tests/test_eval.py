"""`osdiff eval`: the numbers agree with the metric libraries' own functions, bpp is the bytes
written, BD-rates behave, missing or hostile weight files are skipped with a clear message.

The photographs are scikit-image's bundled ones (skimage/data, shipped in its wheel):
astronaut (NASA, public domain), chelsea (Stefan van der Walt, CC0), coffee (Rachel Michetti,
CC0), rocket (SpaceX, public domain).

No pretrained backbone can be downloaded here, so the agreement tests make backbone files with
seeded random weights (the `backbones` fixture) under the names the libraries look for, and
check that our evaluation path and the libraries' own functions, each loading those files by its
own code, give the same numbers. That proves the plumbing (inputs, ranges, channel order, which
file feeds which network), not the published weights.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from osdiff.cli import main

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the bundled test photographs) is not installed")
if importlib.util.find_spec("torchmetrics") is None:  # not importorskip: it must not import before import_torchvision
    pytest.skip("the eval extra is not installed: pip install -e '.[eval]'", allow_module_level=True)

from osdiff.evaluation import compare, metrics, protocols, weights  # noqa: E402
from osdiff.evaluation.codecs import PillowCodec  # noqa: E402

weights.import_torchvision()  # before the tests import torchmetrics, torch-fidelity, lpips or compressai

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def cli(*args: object, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path_factory, monkeypatch):
    """No test sees this machine's torch hub cache: whatever weights it holds, 'missing' means missing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return {name: getattr(skimage_data, name)() for name in PHOTOS}


@pytest.fixture(scope="session")
def photo_files(photos, tmp_path_factory) -> list[Path]:
    """Crops of the photos as PNG files (192x256: large enough for MS-SSIM, small enough to be quick)."""
    d = tmp_path_factory.mktemp("photos")
    for name, image in photos.items():
        Image.fromarray(image[:192, :256]).save(d / f"{name}.png")
    return sorted(d.glob("*.png"))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    codec = PillowCodec("jpeg", quality)
    return codec.decode(codec.encode(image))


def _save_state(module: torch.nn.Module, path: Path, unused: tuple[str, ...] = ()) -> None:
    # Layers no metric uses (the ImageNet classifiers) are stored as one broadcast zero: a few
    # bytes instead of hundreds of megabytes, loaded by the libraries all the same.
    state = {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) if k.startswith(unused) else v
             for k, v in module.state_dict().items()}
    torch.save(state, path)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> Path:
    """A torch hub directory whose checkpoints/ holds seeded random AlexNet, VGG16 and
    InceptionV3 weights under the published file names (the modules' own initializations)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    import torchvision

    hub = tmp_path_factory.mktemp("hub")
    ckpt = hub / "checkpoints"
    ckpt.mkdir()
    torch.manual_seed(0)
    _save_state(torchvision.models.alexnet(weights=None), ckpt / weights.ALEXNET.file, ("classifier",))
    _save_state(torchvision.models.vgg16(weights=None), ckpt / weights.VGG16.file, ("classifier",))
    with pytest.MonkeyPatch.context() as mp:  # build torch-fidelity's InceptionV3 without its weights
        mp.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        inception = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in inception.modules():  # He initialization: through 90-odd layers PyTorch's default fades to zero
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    _save_state(inception, ckpt / weights.INCEPTION.file)
    return hub


@pytest.fixture
def use_hub(backbones, monkeypatch):
    """The libraries' own functions, called directly, load from `backbones` too."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(backbones))
    return backbones


# --- distortion ----------------------------------------------------------------------------------


def test_an_image_against_itself_has_infinite_psnr_and_ms_ssim_one(photos):
    scores = metrics.ImageMetrics()
    for name, image in photos.items():
        r = scores(image, image.copy())
        assert r["psnr-rgb"] == math.inf, name
        assert r["ms-ssim-rgb"] == pytest.approx(1.0, abs=1e-6), name
        assert r["ms-ssim-rgb-db"] > 60, name


def test_psnr_and_ms_ssim_agree_with_skimage_pytorch_msssim_and_compressai_eval(photos):
    import pytorch_msssim
    from skimage.metrics import peak_signal_noise_ratio

    threads = torch.get_num_threads()
    try:
        from compressai.utils.eval_model.__main__ import compute_metrics
    finally:
        torch.set_num_threads(threads)  # that module sets 1 on import, for the rest of the process

    scores = metrics.ImageMetrics()
    for name, image in photos.items():
        decoded = jpeg(image, 20)
        ours = scores(image, decoded)
        assert ours["psnr-rgb"] == pytest.approx(peak_signal_noise_ratio(image, decoded, data_range=255), rel=1e-12)
        x, y = (torch.tensor(im).permute(2, 0, 1)[None].float() for im in (image, decoded))
        assert ours["ms-ssim-rgb"] == pytest.approx(float(pytorch_msssim.ms_ssim(x, y, data_range=255)), abs=1e-7)
        theirs = compute_metrics(x / 255, y / 255)  # CompressAI's eval_model, on [0, 1] input
        assert ours["psnr-rgb"] == pytest.approx(theirs["psnr-rgb"], abs=1e-4), name
        assert ours["ms-ssim-rgb"] == pytest.approx(theirs["ms-ssim-rgb"], abs=1e-6), name
        assert ours["ms-ssim-rgb-db"] == pytest.approx(-10 * math.log10(1 - ours["ms-ssim-rgb"]))


def test_ms_ssim_is_skipped_on_images_too_small_for_its_five_scales(photos):
    scores = metrics.ImageMetrics()
    small = photos["coffee"][:160, :300]
    r = scores(small, jpeg(small, 50), "coffee_crop.png")
    assert "ms-ssim-rgb" not in r and "psnr-rgb" in r
    assert "161 pixels" in scores.skipped["ms-ssim-rgb"] and "coffee_crop.png is 300x160" in scores.skipped["ms-ssim-rgb"]


# --- perception: agreement with the libraries, with seeded random backbones ----------------------


@pytest.mark.slow
def test_lpips_and_dists_agree_with_torchmetrics_and_the_original_implementations(photos, use_hub):
    import lpips
    from DISTS_pytorch import DISTS
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    scores = metrics.ImageMetrics(str(use_hub / "checkpoints"))
    assert scores.skipped == {}
    image = photos["astronaut"][:224, :320]
    decoded = jpeg(image, 10)
    ours = scores(image, decoded)
    x, y = metrics.to_tensor(image), metrics.to_tensor(decoded)
    # (each VGG16 takes seconds to build, so each library's function is called once, not every pairing)
    with torch.no_grad():
        for net in ("alex", "vgg"):
            direct = float(learned_perceptual_image_patch_similarity(y, x, net_type=net, normalize=True))
            assert ours[f"lpips-{net}"] == pytest.approx(direct, abs=1e-6)
        assert ours["lpips-alex"] == pytest.approx(float(lpips.LPIPS(net="alex", verbose=False)(y, x, normalize=True)), abs=1e-6)
        assert ours["dists"] == pytest.approx(float(DISTS()(x, y)), abs=1e-6)
    assert ours["lpips-alex"] > 0 and ours["lpips-vgg"] > 0 and ours["dists"] > 0
    same = scores(image, image.copy())
    assert all(same[k] == pytest.approx(0, abs=1e-6) for k in ("lpips-alex", "lpips-vgg", "dists"))


def test_patches_follow_hifics_grid_and_its_shift_by_128(photos):
    image = np.zeros((512, 768, 3), np.uint8)  # a Kodak-sized image: 2x3 tiles, then 1x2 shifted
    assert len(metrics.patches(image)) == metrics.patch_count(512, 768) == 8
    for image in photos.values():
        h, w = image.shape[:2]
        p = metrics.patches(image)
        assert len(p) == metrics.patch_count(h, w)
        assert np.array_equal(p[0], image[:256, :256])
        if h >= 384 and w >= 384:
            top, left = 128 + (h - 384) // 256 * 256, 128 + (w - 384) // 256 * 256  # the last shifted tile
            assert np.array_equal(p[-1], image[top : top + 256, left : left + 256])
    assert metrics.patch_count(255, 1000) == 0


@pytest.mark.slow
def test_fid_and_kid_on_patches_agree_with_torchmetrics(photos, use_hub):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    pairs = [(photos["astronaut"], jpeg(photos["astronaut"], 5))]  # 5 patches
    n = sum(len(metrics.patches(a)) for a, _ in pairs)
    fid = metrics.PatchFID(n, min_patches=2, weights_dir=str(use_hub / "checkpoints"))
    assert fid.skipped == {}
    fid.new_point()  # point 1: the originals themselves
    for a, _ in pairs:
        fid.add(a, a.copy())
    same = fid.compute()
    fid.new_point()  # point 2: the originals' features are kept, only the decoded side is new
    for a, b in pairs:
        fid.add(a, b)
    ours = fid.compute()
    assert same["fid"] == pytest.approx(0, abs=1e-2)
    assert ours["fid"] > 1e-2 and ours["kid"] > same["kid"]  # (KID's unbiased estimate of 0 can come out negative)

    direct_fid = FrechetInceptionDistance(feature=2048)
    direct_kid = KernelInceptionDistance(subset_size=n)
    for a, b in pairs:
        for image, real in ((a, True), (b, False)):
            p = torch.tensor(metrics.patches(image)).permute(0, 3, 1, 2)
            direct_fid.update(p, real=real)
            direct_kid.update(p, real=real)
    torch.manual_seed(0)
    kid_mean, kid_std = direct_kid.compute()
    assert ours["fid"] == pytest.approx(float(direct_fid.compute()), rel=1e-5)
    assert ours["kid"] == pytest.approx(float(kid_mean), rel=1e-5, abs=1e-9)


def test_fid_is_skipped_on_a_set_too_small(tmp_path):
    fid = metrics.PatchFID(13, min_patches=100)
    assert not fid.active
    assert "needs at least 100 patches" in fid.skipped["fid"] and "gives 13" in fid.skipped["kid"]


# --- weight files: missing, hostile, wrong ---------------------------------------------------------


def test_missing_backbone_weights_skip_the_metric_and_name_the_file(photos, tmp_path):
    scores = metrics.ImageMetrics(str(tmp_path))
    assert set(scores.skipped) == {"lpips-alex", "lpips-vgg", "dists"}
    assert "alexnet-owt-7be5be79.pth" in scores.skipped["lpips-alex"] and str(tmp_path) in scores.skipped["lpips-alex"]
    assert "vgg16-397923af.pth" in scores.skipped["lpips-vgg"] and "vgg16-397923af.pth" in scores.skipped["dists"]
    r = scores(photos["chelsea"], jpeg(photos["chelsea"], 30))
    assert set(r) == {"psnr-rgb", "ms-ssim-rgb", "ms-ssim-rgb-db"}
    fid = metrics.PatchFID(500, min_patches=100, weights_dir=str(tmp_path))
    assert "weights-inception-2015-12-05-6726825d.pth" in fid.skipped["fid"]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_weight_file_that_would_run_code_is_refused_before_any_library_loads_it(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "weights"
    folder.mkdir()
    with open(folder / weights.ALEXNET.file, "wb") as f:
        pickle.dump({"features.0.weight": _RunsCode(marker)}, f)
    scores = metrics.ImageMetrics(str(folder))
    assert "not a plain file of tensors" in scores.skipped["lpips-alex"]
    assert not marker.exists()


def test_a_weight_file_with_other_weights_is_named_in_a_clear_skip(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save({"conv.weight": torch.zeros(3, 3)}, folder / weights.ALEXNET.file)
    scores = metrics.ImageMetrics(str(folder))
    assert f"{folder / weights.ALEXNET.file}: does not hold torchvision's AlexNet" in scores.skipped["lpips-alex"]


def test_nothing_is_downloaded_even_when_a_library_asks(tmp_path):
    with weights.hub_holding([]):
        with pytest.raises(weights.MissingWeights, match="nothing is downloaded"):
            torch.hub.load_state_dict_from_url("https://example.invalid/x.pth")
    assert torch.hub.download_url_to_file is not weights._no_download


# --- the evaluation: real streams, bpp, CSV, JSON -------------------------------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_jpeg_eval_bpp_is_eight_times_the_bytes_written_per_pixel(photo_files, tmp_path):
    cli("eval", *photo_files, "--codec", "jpeg", "--quality", "10,50", "-o", tmp_path, "--no-progress")
    doc = json.loads((tmp_path / "jpeg.json").read_text())
    assert doc["name"] == "jpeg" and doc["points"] == ["jpeg-q10", "jpeg-q50"]
    assert doc["results"]["quality"] == [10, 50]
    rows = _rows(tmp_path / "jpeg.csv")
    assert len(rows) == 2 * len(photo_files)
    originals = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in photo_files}
    for row in rows:
        stream = tmp_path / "streams" / row["point"] / (row["image"] + ".jpg")
        assert int(row["bytes"]) == stream.stat().st_size
        h, w = int(row["height"]), int(row["width"])
        assert float(row["bpp"]) == pytest.approx(8 * stream.stat().st_size / (h * w), rel=1e-12)
        decoded = np.asarray(Image.open(stream).convert("RGB"))
        from skimage.metrics import peak_signal_noise_ratio
        assert float(row["psnr-rgb"]) == pytest.approx(peak_signal_noise_ratio(originals[row["image"]], decoded, data_range=255))
    for i, point in enumerate(doc["points"]):
        mine = [r for r in rows if r["point"] == point]
        assert doc["results"]["bpp"][i] == pytest.approx(np.mean([float(r["bpp"]) for r in mine]))
        assert doc["results"]["psnr-rgb"][i] == pytest.approx(np.mean([float(r["psnr-rgb"]) for r in mine]))
    assert doc["results"]["bpp"][0] < doc["results"]["bpp"][1]
    assert "lpips-alex" in doc["skipped"] and "lpips-alex" not in doc["results"]
    # a skipped metric has no column either; times are in seconds and say so
    assert not set(doc["skipped"]) & set(rows[0]), rows[0].keys()
    assert float(rows[0]["encoding_time_s"]) > 0 and float(rows[0]["decoding_time_s"]) > 0
    assert doc["units"]["encoding_time"] == "s" and doc["units"]["bpp"] == "bits per pixel"
    first = [float(r["encoding_time_s"]) for r in rows if r["point"] == "jpeg-q10"]
    assert doc["results"]["encoding_time"][0] == pytest.approx(np.mean(first))


def test_osdiff_eval_writes_streams_that_decode_to_what_was_scored(photo_files, tiny_dir, tiny_model, tmp_path):
    from osdiff.files import psnr, read_image
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    files = photo_files[:2]
    result = cli("eval", *files, "--sd", tiny_dir / "sd21_tiny.ckpt", "--osdiff", tiny_dir / "osdiff_tiny.ckpt",
                 "--config", tiny_dir / "config.json", "-o", tmp_path, "--name", "tiny", "--no-progress")
    assert "skipping lpips-alex" in result.output and "alexnet-owt-7be5be79.pth" in result.output
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["description"].startswith("OSDiff") and len(doc["results"]["bpp"]) == 1
    codec = Codec(TorchBackend(tiny_model))
    for row in _rows(tmp_path / "tiny.csv"):
        stream = tmp_path / "streams" / "tiny" / (row["image"] + ".osd")
        assert int(row["bytes"]) == stream.stat().st_size
        assert float(row["bpp"]) == pytest.approx(8 * stream.stat().st_size / (int(row["height"]) * int(row["width"])))
        decoded = codec.decompress(stream.read_bytes())
        original = read_image(next(f for f in files if f.stem == row["image"]))
        assert float(row["psnr-rgb"]) == pytest.approx(psnr(original, decoded), rel=1e-12)


def test_an_unreadable_image_stops_the_eval_before_anything_is_written(photo_files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    result = cli("eval", photo_files[0], bad, "--codec", "jpeg", "-o", tmp_path / "out", "--no-progress", ok=False)
    assert result.exit_code == 1 and "not a readable image" in result.output
    assert not (tmp_path / "out").exists()


# --- protocols ------------------------------------------------------------------------------------


def test_clic768_matches_torchvisions_resize_and_center_crop(photos):
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(768), transforms.CenterCrop(768)])
    for name, image in photos.items():
        for im in (image, image[:300, :]):  # upscaled, and a wide crop
            ours = protocols.prepare(im, "clic768")
            assert ours.shape == (768, 768, 3)
            assert np.array_equal(ours, np.asarray(reference(Image.fromarray(im)))), name
    big = np.asarray(Image.fromarray(photos["rocket"]).resize((2000, 1400)))  # downscaled, landscape
    assert np.array_equal(protocols.prepare(big, "clic768"), np.asarray(reference(Image.fromarray(big))))


def test_kodak_protocol_checks_the_size_and_changes_nothing(photos):
    kodak = np.zeros((512, 768, 3), np.uint8)
    assert protocols.prepare(kodak, "kodak") is kodak
    with pytest.raises(ValueError, match="not a Kodak image"):
        protocols.prepare(photos["astronaut"], "kodak")
    assert protocols.prepare(photos["astronaut"], "none") is photos["astronaut"]


# --- BD-rate and plots ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweeps(photo_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweeps")
    for codec in ("jpeg", "webp"):
        cli("eval", *photo_files, "--codec", codec, "--quality", "5,15,30,50,80", "-o", out, "--no-progress")
    return out


def _halved(curve: compare.Curve) -> compare.Curve:
    return compare.Curve(curve.name + "-half", "", {**curve.results, "bpp": [b / 2 for b in curve.results["bpp"]]})


def test_bd_rate_of_a_curve_against_itself_is_zero_and_against_half_the_rate_minus_50(sweeps):
    curve = compare.read_curve(sweeps / "jpeg.json")
    # a lower-is-better metric too (the sign convention): one that falls as the rate grows
    curve.results["lpips-alex"] = [1 / p for p in curve.results["psnr-rgb"]]
    for metric in ("psnr-rgb", "ms-ssim-rgb-db", "lpips-alex"):
        same, _ = compare.bd_rate(curve, curve, metric)
        half, _ = compare.bd_rate(curve, _halved(curve), metric)
        assert same == pytest.approx(0, abs=1e-9), metric
        assert half == pytest.approx(-50, abs=1e-6), metric
        double, _ = compare.bd_rate(_halved(curve), curve, metric)
        assert double == pytest.approx(100, abs=1e-6), metric


def test_webp_needs_fewer_bits_than_jpeg_for_the_same_psnr_on_these_photos(sweeps):
    jpeg_curve, webp_curve = (compare.read_curve(sweeps / f"{c}.json") for c in ("jpeg", "webp"))
    value, note = compare.bd_rate(jpeg_curve, webp_curve, "psnr-rgb")
    assert value is not None and value < 0, note


def test_bd_rate_says_why_when_it_cannot_be_computed(sweeps):
    curve = compare.read_curve(sweeps / "jpeg.json")
    one = compare.Curve("one", "", {k: v[:1] for k, v in curve.results.items()})
    assert compare.bd_rate(curve, one, "psnr-rgb") == (None, "one has 1 point(s); BD-rate needs 2 or more")
    assert compare.bd_rate(curve, curve, "dists")[1] == "jpeg has no dists"


def test_compare_prints_bd_rates_and_draws_every_metric(sweeps, tmp_path):
    curve = json.loads((sweeps / "jpeg.json").read_text())
    single = {"name": "one-point", "description": "", "results": {k: v[2:3] for k, v in curve["results"].items()}}
    (tmp_path / "single.json").write_text(json.dumps(single))
    # a published curve in CompressAI's layout: psnr-rgb and ms-ssim-rgb only, and split over two files
    pub = {"name": "published", "description": "paper", "results": {
        "bpp": [0.2, 0.4], "psnr-rgb": [25.0, 28.0], "ms-ssim-rgb": [0.9, 0.95]}}
    pub2 = {"name": "published", "results": {"bpp": [0.8, 1.6], "psnr-rgb": [31.0, 34.0], "ms-ssim-rgb": [0.97, 0.985]}}
    (tmp_path / "pub.json").write_text(json.dumps(pub))
    (tmp_path / "pub2.json").write_text(json.dumps(pub2))
    result = cli("eval", "--compare", sweeps / "jpeg.json", sweeps / "webp.json", tmp_path / "single.json",
                 "--published", tmp_path / "pub.json", "--published", tmp_path / "pub2.json", "-o", tmp_path / "cmp")
    assert "BD-rate against jpeg" in result.output and "at " in result.output
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["curves"]["published"] == {"points": 4, "description": "paper", "published": True}
    assert doc["bd_rate"]["webp"]["psnr-rgb"]["bd_rate"] < 0
    assert doc["bd_rate"]["published"]["ms-ssim-rgb-db"]["bd_rate"] is not None
    (row,) = doc["at_rate"]
    assert row["curve"] == "one-point" and row["jpeg"]["psnr-rgb"] == pytest.approx(row["one-point"]["psnr-rgb"])
    with Image.open(tmp_path / "cmp" / "rd.png") as im:
        assert im.format == "PNG" and im.width > 800
    # without -o: the same tables, and no file
    printed = cli("eval", "--compare", sweeps / "jpeg.json", sweeps / "webp.json", tmp_path / "single.json",
                  "--published", tmp_path / "pub.json", "--published", tmp_path / "pub2.json")
    assert printed.output == result.output.split("\nwrote ")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "pub.json", "pub2.json", "single.json"]
    assert "give -o DIR" in cli("eval", *sweeps.glob("*.json"), "--codec", "jpeg", ok=False).output


def test_compare_leaves_out_its_own_earlier_output(sweeps, tmp_path):
    """`results/*.json` after `--compare -o results` catches compare.json: left out, with a note."""
    import shutil

    for codec in ("jpeg", "webp"):
        shutil.copy(sweeps / f"{codec}.json", tmp_path)
    first = cli("eval", "--compare", *sorted(tmp_path.glob("*.json")), "-o", tmp_path)
    again = cli("eval", "--compare", *sorted(tmp_path.glob("*.json")))
    assert "leaving out" in again.output and "compare.json" in again.output
    assert again.output.split("\n", 1)[1] == first.output.split("\nwrote ")[0]


def test_compare_refuses_a_file_that_is_not_a_results_file(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"results": {"psnr-rgb": [30]}}))
    result = cli("eval", "--compare", tmp_path / "x.json", "-o", tmp_path / "cmp", ok=False)
    assert result.exit_code == 1 and "not a results file in CompressAI's layout" in result.output


def test_results_json_is_in_compressais_layout(sweeps):
    doc = json.loads((sweeps / "webp.json").read_text())
    assert {"name", "description", "results"} <= set(doc)
    n = len(doc["points"])
    assert all(isinstance(v, list) and len(v) == n for v in doc["results"].values())
    assert {"bpp", "psnr-rgb", "ms-ssim-rgb", "ms-ssim-rgb-db", "encoding_time", "decoding_time"} <= set(doc["results"])
    assert "Pillow" in doc["description"] and doc["versions"]["libwebp"] not in ("None", "")


@pytest.mark.slow
def test_eval_reports_every_metric_when_every_backbone_is_there(photos, backbones, tmp_path):
    Image.fromarray(photos["rocket"][:256, :512]).save(tmp_path / "rocket.png")  # two FID patches
    cli("eval", tmp_path / "rocket.png", "--codec", "webp", "--quality", "10", "--metric-weights", backbones / "checkpoints",
        "--fid-min-patches", "2", "-o", tmp_path / "out", "--no-progress")
    doc = json.loads((tmp_path / "out" / "webp.json").read_text())
    assert doc["skipped"] == {} and doc["dataset"]["fid_patches"] == 2
    for key in (*metrics.PER_IMAGE, *metrics.PER_SET):
        assert len(doc["results"][key]) == 1 and math.isfinite(doc["results"][key][0]), key
    for row in _rows(tmp_path / "out" / "webp.csv"):
        assert all(float(row[k]) > 0 for k in ("lpips-alex", "lpips-vgg", "dists"))


def test_eval_says_what_to_install_and_refuses_odd_arguments(photo_files, tmp_path, monkeypatch):
    import osdiff.evaluation

    monkeypatch.setattr(osdiff.evaluation, "EXTRA_MODULES", (*osdiff.evaluation.EXTRA_MODULES, "no_such_module_x"))
    result = cli("eval", photo_files[0], "--codec", "jpeg", "-o", tmp_path, ok=False)
    assert "needs the eval extra (missing: no_such_module_x)" in result.output
    monkeypatch.undo()
    assert "plain file name" in cli("eval", photo_files[0], "--codec", "jpeg", "--name", "../x", "-o", tmp_path, ok=False).output
    assert "takes no model" in cli("eval", photo_files[0], "--codec", "webp", "--random-weights", "-o", tmp_path, ok=False).output
    assert not any(tmp_path.iterdir())


def test_images_too_large_for_the_perceptual_networks_are_refused_before_they_run():
    scores = metrics.ImageMetrics()
    big = np.zeros((2049, 2048, 3), np.uint8)
    scores.check_sizes([(2049, 2048)], ["big"])  # no network to run: PSNR and MS-SSIM have no such limit
    scores._nets = {"dists": None}  # as if DISTS were there; it must not be called
    with pytest.raises(ValueError, match=r"big: 2048x2049 is over the 4.2 megapixels"):
        scores.check_sizes([(512, 768), (2049, 2048)], ["kodim01", "big"])
    with pytest.raises(ValueError, match="megapixels"):
        scores(big, big)
