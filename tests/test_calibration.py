"""`osdiff calibrate`: calibration images, ModelOpt quantization, Q/DQ export, and running the
result (calibration/, runtime/backends/onnxruntime_backend.py, engine/build.py).

CI calibrates the tiny reference model end to end (64-pixel crops, no sensitivity search; under a
minute): Q/DQ placement, integer kernels in ONNX Runtime, ORT against fake quantization, streams
across fp32/INT8; and G_s alone with the sensitivity search (the extra skips). The built-in model
(trained, so its losses mean something) is calibrated with the sensitivity search on 128-pixel
crops of its default calibration photos in the tests marked slow. They need nvidia-modelopt (the `calibrate` extra, which `make` installs) and are skipped
with the reason where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from osdiff.calibration.images import (CalibrationError, MIN_IMAGES, VALIDATION_EVERY, load_calibration_images,
                                       load_calibration_set)
from osdiff.calibration.precision import QUANTIZED_GRAPHS
from osdiff.calibration.quantize import block_of, blocks, quantizable_layers

needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt is not installed (pip install -e '.[calibrate]')")
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image (the calibration and held-out photos) is not installed")

CROP = 128


# ---------------------------------------------------------------------------------------------
# Calibration images
# ---------------------------------------------------------------------------------------------


def _save(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _noise(seed: int, h: int = 150, w: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_folder_of_images_gives_square_crops(tmp_path):
    for i in range(MIN_IMAGES):
        _save(tmp_path / f"im{i}.png", _noise(i))
    crops = load_calibration_images([tmp_path], 128, crops=2)
    assert len(crops) == 2 * MIN_IMAGES
    assert all(c.pixels.shape == (128, 128, 3) and c.pixels.dtype == np.uint8 for c in crops)
    assert crops[0].name == "im0.png@scaled" and crops[1].name == "im0.png@native1"


def test_every_third_image_validates_whole_and_sets_no_range(tmp_path):
    """load_calibration_set: images 3, 6, ... are kept out of the crops and given whole, scaled
    down (aspect kept) to the measure size, never up; a measure size under the crop is refused."""
    sizes = [(150, 200), (300, 900), (500, 400), (150, 200), (150, 200), (150, 200), (150, 200)]
    for i, (h, w) in enumerate(sizes):
        _save(tmp_path / f"im{i}.png", _noise(i, h, w))
    cs = load_calibration_set([tmp_path], 128, crops=1, measure_size=450)
    assert [v.name for v in cs.validation] == ["im2.png@whole", "im5.png@whole"]
    assert VALIDATION_EVERY == 3 and [c.name for c in cs.crops] == [f"im{i}.png@scaled" for i in (0, 1, 3, 4, 6)]
    assert cs.validation[0].pixels.shape == (450, 360, 3)  # 500x400 scaled down
    assert cs.validation[1].pixels.shape == (150, 200, 3)  # smaller than 450: as it is
    with pytest.raises(CalibrationError, match="--measure-size \\(100\\) must be at least --crop \\(128\\)"):
        load_calibration_set([tmp_path], 128, measure_size=100)
    with pytest.raises(CalibrationError, match="--crop and --crops-per-image must be positive \\(got 0, 1\\)"):
        load_calibration_set([tmp_path], 0, measure_size=0)
    _save(tmp_path / "im5.png", _noise(5, 100, 300))  # a validation picture smaller than the crop, as a crop would be
    with pytest.raises(CalibrationError, match="im5.png: 100x300 is 100x300, smaller than the 128x128 calibration crop"):
        load_calibration_set([tmp_path], 128, measure_size=450)
    _save(tmp_path / "im5.png", _noise(5, 150, 1200))  # large enough, until scaled to the measure size
    with pytest.raises(CalibrationError, match=r"im5.png: 150x1200 \(scaled to --measure-size 450\) is 56x450, "
                                               "smaller than the 128x128"):
        load_calibration_set([tmp_path], 128, measure_size=450)


def test_ms_ssim_only_where_every_picture_allows_it_and_the_verdict_says_so():
    """Validation pictures differ in size: MS-SSIM (five scales: over 160 pixels) is measured only
    when every picture is large enough, and a verdict without it does not claim both targets."""
    pytest.importorskip("pytorch_msssim", reason="pytorch-msssim (the eval extra) is not installed")
    from osdiff.calibration.calibrate import PrecisionResult, verdict
    from osdiff.calibration.pipeline import quality

    big, small = _noise(0, 200, 220), _noise(1, 150, 400)
    other_big, other_small = _noise(2, 200, 220), _noise(3, 150, 400)
    assert "ms_ssim_drop" in quality([big], [big], [other_big])
    q = quality([big, small], [big, small], [other_big, other_small])
    assert "ms_ssim_drop" not in q and q["psnr_drop_db"] == 0
    r = PrecisionResult("int8", {}, {}, {}, {}, q, within_targets=True, registered=True, seconds=0.0)
    assert "within the PSNR target (0.3 dB) on the validation pictures; the MS-SSIM one unchecked" in verdict(r)


def test_too_few_images_is_a_clear_error(tmp_path):
    for i in range(MIN_IMAGES - 1):
        _save(tmp_path / f"im{i}.png", _noise(i))
    with pytest.raises(CalibrationError, match=f"at least {MIN_IMAGES} images, got {MIN_IMAGES - 1}"):
        load_calibration_images([tmp_path], 128)


def test_unreadable_image_is_named(tmp_path):
    for i in range(MIN_IMAGES):
        _save(tmp_path / f"im{i}.png", _noise(i))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CalibrationError, match="broken.png"):
        load_calibration_images([tmp_path], 128)


def test_image_smaller_than_the_crop_is_refused(tmp_path):
    for i in range(MIN_IMAGES):
        _save(tmp_path / f"im{i}.png", _noise(i, 100, 300))
    with pytest.raises(CalibrationError, match="smaller than the 128x128"):
        load_calibration_images([tmp_path], 128)


def test_demo_photo_is_refused_by_content_under_any_name(tmp_path):
    from importlib import resources

    from osdiff.files import read_image

    for i in range(MIN_IMAGES):
        _save(tmp_path / f"im{i}.png", _noise(i))
    with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as demo:
        _save(tmp_path / "holiday.png", read_image(demo))
    with pytest.raises(CalibrationError, match="evaluation image.*demo.png"):
        load_calibration_images([tmp_path], 128)


@needs_skimage
@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"])
def test_held_out_photos_are_refused(tmp_path, name):
    from osdiff.training.data import bundled_photo

    for i in range(MIN_IMAGES):
        _save(tmp_path / f"im{i}.png", _noise(i))
    _save(tmp_path / "renamed.png", bundled_photo(name))  # by content
    with pytest.raises(CalibrationError, match=f"renamed.png \\({name}\\)"):
        load_calibration_images([tmp_path], 128)
    (tmp_path / "renamed.png").unlink()
    _save(tmp_path / f"{Path(name).stem}.png", _noise(9))  # by name, and the message says so
    with pytest.raises(CalibrationError,
                       match=f"{Path(name).stem}.png \\(the file name of an evaluation image, not its pixels; rename"):
        load_calibration_images([tmp_path], 128)


def test_held_out_wallpapers_are_refused_by_file_and_every_one_is_named(tmp_path):
    """A held-out wallpaper's original file (not the 768-pixel copy the evaluation uses) under
    another name is refused, and so is every other evaluation image of the folder, in one
    message; a user's own photo that merely shares a wallpaper's name (path.png) is not."""
    from osdiff.training import wallpapers

    for i in range(MIN_IMAGES):
        _save(tmp_path / f"im{i}.png", _noise(i))
    _save(tmp_path / "path.png", _noise(7))
    assert len(load_calibration_images([tmp_path], 128)) == MIN_IMAGES + 1
    if not wallpapers.available():
        pytest.skip(f"no wallpaper file to rename: {wallpapers.missing_message()}")
    (tmp_path / "forest.jpg").write_bytes((wallpapers.photo_dir() / "Path.jpg").read_bytes())
    (tmp_path / "sky.jpg").write_bytes((wallpapers.photo_dir() / "Kite.jpg").read_bytes())
    with pytest.raises(CalibrationError, match="forest.jpg \\(Path, a held-out.*sky.jpg \\(Kite, a held-out"):
        load_calibration_images([tmp_path], 128)


@needs_skimage
def test_default_images_are_the_training_photos():
    """The wheels' six training photos and, when fetched, the four training wallpapers that are
    photographs; none of the held-out set; the validation pictures are the portrait and (with
    the wallpapers) the two with water and sky."""
    from osdiff.training import wallpapers
    from osdiff.training.data import HELD_OUT_SET, TRAIN_PHOTOS

    names = [c.name.split("@")[0] for c in load_calibration_images(None, 128)]
    training_wallpapers = {w.name for w in wallpapers.WALLPAPERS if w.photo and not w.held_out}
    assert set(names) == set(TRAIN_PHOTOS) | (training_wallpapers if wallpapers.available() else set())
    assert not set(names) & set(HELD_OUT_SET)
    validation = [v.name for v in load_calibration_set(None, 128).validation]
    assert validation == (["grace_hopper.jpg@whole", "ColdRipple@whole", "DarkestHour@whole"] if wallpapers.available()
                          else ["grace_hopper.jpg@whole", "motorcycle_right.png@whole"])


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, block", [
    ("unet.input_blocks.1.0.in_layers.2", "unet.input_blocks.1"),
    ("unet.middle_block.1.transformer_blocks.0.ff.net.2", "unet.middle_block.1"),
    ("control.enc_zero_convs_out.3.0", "control.enc_zero_convs_out.3"),
    ("decoder.up.1.block.0.conv1", "decoder.up.1.block.0"),
    ("decoder.up.1.upsample.conv", "decoder.up.1.upsample"),
    ("encoder.down.0.downsample.conv", "encoder.down.0.downsample"),
    ("decoder.mid.attn_1.q", "decoder.mid.attn_1"),
    ("unet.time_embed.0", "unet.time_embed"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("post_quant_conv", "post_quant_conv"),
])
def test_block_of(layer, block):
    assert block_of(layer) == block


def test_blocks_cover_every_layer_once():
    from osdiff.config import ModelConfig
    from osdiff.export.model import build_stages

    with torch.device("meta"):
        stages = build_stages(ModelConfig.demo(), with_text=False)
    for g in QUANTIZED_GRAPHS:
        layers = quantizable_layers(stages[g])
        grouped = [layer for ls in blocks(stages[g]).values() for layer in ls]
        assert sorted(grouped) == sorted(layers) and len(set(grouped)) == len(grouped)


def test_build_picks_the_asked_variant_per_graph():
    from osdiff.engine.build import graph_precision

    assert graph_precision({"fp32": {}, "fp16": {}, "int8": {}}, "int8") == "int8"
    assert graph_precision({"fp32": {}, "fp16": {}}, "int8") == "fp16"
    assert graph_precision({"fp32": {}}, "fp8") == "fp32"  # an entropy-model graph


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model (CI): calibrate, export the Q/DQ graphs, run them in ONNX Runtime
# ---------------------------------------------------------------------------------------------

# blocks kept float from the start (as the sensitivity analysis would leave them): a transformer
# (Linear layers and attention) and the last convolution of the VAE decoder
TINY_SKIP = {"denoiser": ["unet.middle_block.1"], "vae_decoder": ["decoder.conv_out"]}


@pytest.fixture(scope="module")
def tiny_crops():
    """Two 64-pixel crops (the tiny model's pad multiple) of the training photos: what the
    pipeline does with them is checked, not how good the ranges are (the CLI asks for at least
    MIN_IMAGES), and every crop is another pass of each fake-quantized graph."""
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image (the calibration photos) is not installed")
    return load_calibration_images(None, 64)[:2]


@pytest.fixture(scope="module")
def tiny_validation():
    """One whole validation picture (grace_hopper.jpg scaled to 128 pixels on its longer side: 128x109,
    not a multiple of the tiny model's pad multiple), what the tiny calibration measures on."""
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image (the calibration photos) is not installed")
    (picture,) = (v for v in load_calibration_set(None, 64, measure_size=128).validation
                  if v.name == "grace_hopper.jpg@whole")
    return [picture]


def test_int8_without_a_calibrated_export_is_a_clear_error(tiny_export):
    """An export without INT8 graphs refuses --precision int8, naming the graphs and the command.
    (First of the tiny tests: the session's export is set up here, so that --durations gives
    the calibration its own line, the setup of the next test.)"""
    from osdiff.export.onnx_export import ExportError
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    with pytest.raises(ExportError, match="has no int8 variant of .*'denoiser'.*; `osdiff calibrate --engines DIR "
                                          "--precision int8` \\(and the model: --config, or its checkpoints\\) adds them"):
        OnnxRuntimeBackend(tiny_export, precision="int8")
    # osdiff build says so too, and, before anyone calibrates for it, that TensorRT is missing here
    from osdiff.engine.build import build_engines
    from osdiff.engine.environment import TensorRTMissing, tensorrt_version
    from osdiff.engine.manifest import EngineError

    try:
        tensorrt_version()
        missing = ""
    except TensorRTMissing:
        missing = "; the build needs TensorRT too: TensorRT "
    with pytest.raises(EngineError, match="the export has no int8 graphs; run `osdiff calibrate --precision int8` "
                                          f"first{missing}"):
        build_engines(tiny_export, tiny_export / "never", [], 0, 3, precision="int8")


@pytest.fixture(scope="module")
def tiny_calibrated(tiny_model, tiny_export, tiny_crops, tiny_validation, tmp_path_factory):
    """The tiny model's export (the session's) calibrated to INT8 whole: every heavy graph
    quantized but for TINY_SKIP, exported with Q/DQ and entered in the manifest (no sensitivity
    search: the tiny model's random weights give no loss worth searching). CI's end-to-end check
    of `osdiff calibrate` (pytest --durations gives its time)."""
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (pip install -e '.[calibrate]')")
    from osdiff.calibration.calibrate import Settings, calibrate

    out = tmp_path_factory.mktemp("tiny_calibrated") / "export"
    shutil.copytree(tiny_export, out)
    (result,) = calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False, skip=TINY_SKIP), accept_loss=True,
                          echo=lambda s: None, validation=tiny_validation)
    return out, result


@needs_modelopt
def test_tiny_qdq_on_quantized_layers_none_on_skipped_or_entropy_graphs(tiny_calibrated, tiny_model, tiny_validation):
    """Every quantized layer: Q/DQ on its input and weight, and a QuantizeLinear on the output of
    each Conv (what ONNX Runtime needs for QLinearConv); no Q/DQ at all on the skipped blocks'
    layers, nor in any graph of the entropy model. The only layers the exporter computes into
    constants (float) are the timestep embedding's first Linears, whose input is the fixed t, and
    the manifest lists them. The manifest names the validation picture the loss was measured on."""
    from osdiff.calibration.qdq_export import count_dequantize, qdq_layers

    out, result = tiny_calibrated
    manifest = json.loads((out / "manifest.json").read_text())
    (picture,) = tiny_validation
    assert manifest["graphs"]["denoiser"]["int8"]["measured_on"] == [f"{picture.name} (128x109)"]
    graphs = tiny_model.graphs()
    assert result.skipped == {g: TINY_SKIP.get(g, []) for g in QUANTIZED_GRAPHS}
    for g in QUANTIZED_GRAPHS:
        module = graphs[g].module
        found = qdq_layers(out / manifest["graphs"][g]["int8"]["file"])
        skipped = {layer for b in TINY_SKIP.get(g, []) for layer in blocks(module)[b]}
        constant = manifest["graphs"][g]["int8"]["constant_layers"]
        assert constant == (["control.control_model.time_embed.0", "unet.time_embed.0"] if g == "denoiser" else [])
        for name, layer in module.named_modules():
            if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                continue
            if name in constant:
                assert name not in found
                continue
            assert name in found, f"{g}: {name} not found in the ONNX graph"
            want = name not in skipped
            conv = isinstance(layer, torch.nn.Conv2d)
            # a float layer right after a quantized convolution reads its dequantized output
            got = found[name] if want else {**found[name], "input": False}
            assert got == {"input": want, "weight": want, "output": want and conv}, \
                f"{g}: {name} {found[name]}, quantized: {want}"
        # attention's own products (no parameter weight) take no Q/DQ
        assert not any(v["input"] or v["output"] for k, v in found.items() if k not in quantizable_layers(module))
        assert skipped or g not in TINY_SKIP
    for name, entry in manifest["graphs"].items():
        assert count_dequantize(out / entry["fp32"]["file"]) == 0
        if name not in QUANTIZED_GRAPHS:
            assert "int8" not in entry, f"{name}: an entropy-model graph must stay fp32"


@needs_modelopt
def test_tiny_attention_stays_float(tiny_calibrated):
    """The attention of the Q/DQ graphs is ONNX Runtime's MultiHeadAttention, computing in
    float: none of its inputs comes out of a DequantizeLinear."""
    from osdiff.calibration.qdq_export import attention_inputs

    out, _ = tiny_calibrated
    manifest = json.loads((out / "manifest.json").read_text())
    for g in ("denoiser", "vae_decoder", "vae_encoder"):
        producers = attention_inputs(out / manifest["graphs"][g]["int8"]["file"])
        assert producers, f"{g}: no MultiHeadAttention in the INT8 graph"
        assert not any("DequantizeLinear" in p for ps in producers for p in ps), f"{g}: {producers}"


@needs_modelopt
def test_tiny_onnx_runtime_runs_int8_convolutions_as_integer_kernels(tiny_calibrated, tiny_model, tmp_path):
    """ONNX Runtime, given the graph as the backend loads it (uint8 activations), turns every
    quantized convolution into a QLinearConv (its integer kernel), none left in float behind its
    DequantizeLinears; and every residual sum of G_s whose skip reads the quantized input
    (calibration/quantize.py quantized_residuals) into an 8-bit QLinearAdd."""
    import onnx

    from osdiff.calibration.quantize import quantized_residuals
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    out, result = tiny_calibrated
    backend = OnnxRuntimeBackend(out, precision="int8")
    graphs = tiny_model.graphs()
    for g in QUANTIZED_GRAPHS:
        module = graphs[g].module
        skipped = {layer for b in TINY_SKIP.get(g, []) for layer in blocks(module)[b]}
        convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and n not in skipped]
        backend.options.optimized_model_filepath = str(tmp_path / f"{g}.onnx")  # what ORT runs
        backend.session(g)
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{g}.onnx")).graph.node]
        assert ops.count("QLinearConv") == len(convs), f"{g}: {ops.count('QLinearConv')} QLinearConv, {len(convs)} INT8 convs"
        if g == "synthesis":  # its six ResidualBottlenecks, none skipped
            residuals = quantized_residuals(result.modules[g])
            assert len(residuals) == 6 and ops.count("QLinearAdd") == 6, f"{ops.count('QLinearAdd')} QLinearAdd"


@needs_modelopt
def test_tiny_onnx_runtime_int8_graphs_lose_what_fake_quantization_loses(tiny_calibrated, tiny_model, tiny_crops):
    """Each INT8 graph in ONNX Runtime (integer kernels) against ModelOpt's fake quantization
    of it, on the graph's real inputs. Not equal: an integer convolution rounds its int32
    accumulator once where fake quantization rounds a float sum, so a value within a rounding
    error of a step's edge lands on the other side, and the next layers carry the step on. The
    stated tolerance: ONNX Runtime's graph is as far from fp32 as fake quantization is, mean
    |ORT - fp32| within 10 % of mean |fake - fp32|."""
    _assert_ort_int8_loses_what_fake_quantization_loses(tiny_model, tiny_crops, *tiny_calibrated)


def _assert_ort_int8_loses_what_fake_quantization_loses(model, crops, out, result) -> None:
    from osdiff.calibration.pipeline import run_fp32
    from osdiff.calibration.quantize import folded
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(out, precision="int8")
    graphs = model.graphs()
    run = run_fp32(model, crops)
    for g in QUANTIZED_GRAPHS:
        ort_err, fake_err = [], []
        quantized = folded(result.modules[g])  # the same outputs as the quantized module, faster
        for args in run.inputs[g]:
            with torch.no_grad():
                fake, ref = quantized(*args), graphs[g].module(*args)
            (got,) = backend.run(g, *args)
            ort_err.append((got - ref).abs().mean().item())
            fake_err.append((fake - ref).abs().mean().item())
        ort_e, fake_e = np.mean(ort_err), np.mean(fake_err)
        assert abs(ort_e / fake_e - 1) <= 0.10, f"{g}: ORT {ort_e:.4g}, fake {fake_e:.4g} from fp32"


@needs_modelopt
def test_tiny_fp32_stream_decodes_with_the_int8_export(tiny_calibrated, tiny_crops):
    """A stream compressed by the fp32 export decodes with the INT8 one (the stream's check
    value proves every symbol was read as written: the entropy graphs are the same fp32), and
    an INT8 encoder's stream decodes with fp32; the INT8 decode stays near fp32's."""
    from osdiff.files import psnr
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.codec import Codec

    out, _ = tiny_calibrated
    fp32, int8 = Codec(OnnxRuntimeBackend(out)), Codec(OnnxRuntimeBackend(out, precision="int8"))
    for i, crop in enumerate(tiny_crops):
        stream = fp32.compress(crop.pixels, seed=i)
        ref, got = fp32.decompress(stream), int8.decompress(stream)
        assert got.shape == ref.shape and psnr(got, ref) > 25, f"crop {i}: {psnr(got, ref):.1f} dB from fp32"
        fp32.decompress(int8.compress(crop.pixels, seed=i))


@pytest.mark.parametrize("aim, losses, kept", [
    (0.7, [0.0060, 0.0040, 0.0034, 0.0020], 2),  # under 0.7 x 0.005 after two blocks: stops there
    (1.0, [0.0060, 0.0040], 1),  # the aim is the targets themselves
    (0.5, [0.0060, 0.0040, 0.0034, 0.0030], 3),  # three candidates only: stops over the aim, and says so
])
def test_extra_skips_stop_once_the_loss_is_under_aim_times_the_targets(aim, losses, kept):
    from osdiff.calibration.calibrate import skip_until_within

    candidates = [("denoiser", "unet.out"), ("vae_decoder", "decoder.conv_out"), ("synthesis", "decoder.g_s2")]
    measured = iter(losses)
    skipped: list[tuple[str, str]] = []
    log: list[str] = []
    q = skip_until_within(candidates, lambda: {"psnr_drop_db": 0.1, "ms_ssim_drop": next(measured)},
                          lambda g, b: skipped.append((g, b)), aim, log.append)
    assert skipped == candidates[:kept] and q["ms_ssim_drop"] == losses[kept]
    assert any("still over" in line for line in log) == (kept == len(candidates))


@needs_modelopt
def test_tiny_extra_skips_follow_the_costs_until_the_loss_is_under_aim_times_the_targets(
        tiny_model, tiny_export, tiny_crops, tiny_validation, tmp_path):
    """With no block over max_block_loss_db, the blocks that stay float are the costliest ones
    by their measured cost against the targets, in that order, added one at a time until the
    loss is under `aim` x the targets or max_extra_skips are spent (G_s alone: the smallest
    graph, so its sensitivity search is quick)."""
    from osdiff.calibration.calibrate import Settings, _against_targets, calibrate, within

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    settings = Settings(graphs=("synthesis",), max_block_loss_db=float("inf"), max_extra_skips=2, aim=1e-9)
    log: list[str] = []
    (r,) = calibrate(tiny_model, out, tiny_crops, settings, accept_loss=True, echo=log.append,
                     validation=tiny_validation)
    costs = sorted(((_against_targets(q), b) for b, q in r.sensitivity["synthesis"].items() if b != "(all blocks)"),
                   reverse=True)
    costliest = [b for c, b in costs if c > 0][:2]
    skipped = r.skipped["synthesis"]
    assert costliest and skipped == costliest[:len(skipped)]
    # it stopped early only because the loss got under aim x the targets
    assert len(skipped) == len(costliest) or within(r.end_to_end, settings.aim)
    assert sum("stays float too" in line for line in log) == len(skipped)


# ---------------------------------------------------------------------------------------------
# End to end on the built-in model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin():
    from osdiff.builtin import load_builtin

    return load_builtin()


@pytest.fixture(scope="module")
def fp32_export(builtin, tmp_path_factory):
    from osdiff.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("builtin_export")
    export_onnx(builtin, out, fp16=False)
    return out


@pytest.fixture(scope="module")
def calibration_set():
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image (the calibration photos) is not installed")
    return load_calibration_set(None, CROP, measure_size=256)


@pytest.fixture(scope="module")
def calibrated(builtin, fp32_export, calibration_set, tmp_path_factory):
    """The built-in model's export with INT8 graphs: ranges from 128-pixel crops of its default
    calibration photos, the loss measured on every third whole at 256 pixels (sensitivity on, accepted
    whatever the loss: the tests check the loss is recorded, not that it meets the targets)."""
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (pip install -e '.[calibrate]')")
    from osdiff.calibration.calibrate import Settings, calibrate

    out = tmp_path_factory.mktemp("calibrated") / "export"
    shutil.copytree(fp32_export, out)
    (result,) = calibrate(builtin, out, calibration_set.crops, Settings(), accept_loss=True, echo=lambda s: None,
                          validation=calibration_set.validation)
    return out, result


@pytest.mark.slow
@needs_modelopt
def test_manifest_entry_per_quantized_graph(calibrated, calibration_set):
    out, result = calibrated
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["graphs"].items():
        if name not in QUANTIZED_GRAPHS:
            assert "int8" not in entry, f"{name}: an entropy-model graph must stay fp32"
            continue
        int8 = entry["int8"]
        assert (out / int8["file"]).exists() and int8["calibrator"] == "percentile"
        assert int8["images"] == [c.name for c in calibration_set.crops]
        assert [m.split(" ")[0] for m in int8["measured_on"]] == [v.name for v in calibration_set.validation]
        assert {"psnr_vs_fp32_db", "psnr_drop_db"} <= set(int8["loss"]) and int8["latent_error"]["max_abs"] > 0
        assert int8["skipped_blocks"] == result.skipped[name]
    report = json.loads((out / "calibration.json").read_text())
    sens = report["results"]["int8"]["sensitivity"]
    for g in QUANTIZED_GRAPHS:  # one measured cost per block, and the skip list follows from them
        assert set(sens[g]) - {"(all blocks)"} == set(blocks(_module(g)))
        over = {b for b, q in sens[g].items() if b != "(all blocks)" and q["psnr_drop_db"] > report["settings"]["max_block_loss_db"]}
        assert over <= set(result.skipped[g])
    assert manifest["calibration"]["int8"]["end_to_end"] == result.end_to_end


def _read_by_a_quantized_layer(path: Path) -> set[str]:
    """Layers (named by their module path) whose output goes through QuantizeLinear ->
    DequantizeLinear (and a nearest upsampling with its own pair) into another Conv/MatMul/Gemm:
    a quantized layer reading it."""
    from osdiff.calibration.qdq_export import _DEQUANT_OPS, _LAYER_OPS, _QUANT_OPS, layer_of

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def through_qdq(tensor: str) -> list[str]:
        return [dq.output[0] for q in consumers.get(tensor, []) if q.op_type in _QUANT_OPS
                for dq in consumers.get(q.output[0], []) if dq.op_type in _DEQUANT_OPS]

    out = set()
    for n in model.graph.node:
        if n.op_type not in _LAYER_OPS:
            continue
        dequantized = through_qdq(n.output[0])
        dequantized += [d for t in dequantized for r in consumers.get(t, []) if r.op_type == "Resize"
                        for d in through_qdq(r.output[0])]
        if any(c.op_type in _LAYER_OPS and c.input[0] == t for t in dequantized for c in consumers.get(t, [])):
            out.add(layer_of(n) or n.name)
    return out


def _module(graph: str) -> torch.nn.Module:
    from osdiff.builtin import load_builtin

    return load_builtin().graphs()[graph].module


@pytest.mark.slow
@needs_modelopt
def test_qdq_on_every_quantized_layer_and_nowhere_else(calibrated, builtin):
    from osdiff.calibration.qdq_export import count_dequantize, qdq_layers

    out, result = calibrated
    manifest = json.loads((out / "manifest.json").read_text())
    graphs = builtin.graphs()
    for g in QUANTIZED_GRAPHS:
        found = qdq_layers(out / manifest["graphs"][g]["int8"]["file"])
        read_quantized = _read_by_a_quantized_layer(out / manifest["graphs"][g]["int8"]["file"])
        by_block = blocks(graphs[g].module)
        skipped = {layer for b in result.skipped[g] for layer in by_block[b]}
        constant = manifest["graphs"][g]["int8"]["constant_layers"]  # computed by the exporter, float
        assert all("time_embed" in layer for layer in constant), constant
        for layer in quantizable_layers(graphs[g].module):
            if layer in constant:
                assert layer not in found
                continue
            assert layer in found, f"{g}: {layer} not found in the ONNX graph"
            want = layer not in skipped
            conv = isinstance(graphs[g].module.get_submodule(layer), torch.nn.Conv2d)
            # a float layer right after a quantized convolution reads that convolution's
            # dequantized output: its own input quantizer is off, but a DequantizeLinear feeds it
            got = found[layer] if want else {**found[layer], "input": False}
            if not want and layer in read_quantized:  # that QuantizeLinear is the next layer's input quantizer
                got["output"] = False
            assert got == {"input": want, "weight": want, "output": want and conv}, \
                f"{g}: {layer} {found[layer]}, quantized: {want}"
        # attention's own MatMuls (under the attention module's path) stay float
        assert not any(v["input"] for k, v in found.items() if k not in quantizable_layers(graphs[g].module))
    for name, entry in manifest["graphs"].items():
        assert count_dequantize(out / entry["fp32"]["file"]) == 0


@needs_modelopt
@pytest.mark.parametrize("layer", [torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Linear(16, 32)])
def test_onnx_runtime_quantizes_a_layer_as_modelopt_does(layer, tmp_path):
    """One quantized layer, ONNX Runtime as the backend loads it (uint8 activations: QLinearConv
    for the convolution, MatMulIntegerToFloat for the Linear) against ModelOpt's fake
    quantization. The uint8 rewrite changes no bit of ORT's output. Linear: equal to float
    rounding (1e-5 of the output's largest value). Conv, whose output is quantized too: the same
    grid of output steps, at most one step apart where the int32 accumulator and the float sum
    round to different sides (under 1 % of the outputs). The same graph with its weights in
    external data (as a full-size denoiser's, over 2 GB) loads the same way, to the same bits."""
    import onnxruntime as ort

    from osdiff.calibration.quantize import Recipe, quantize
    from osdiff.runtime.backends.onnxruntime_int8 import inference_session

    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 12) if isinstance(layer, torch.nn.Conv2d) else torch.randn(2, 40, 16)
    q = quantize(torch.nn.Sequential(layer), [(x,)], Recipe())
    with torch.no_grad():
        torch.onnx.export(q, (x,), str(tmp_path / "layer.onnx"), dynamo=False, opset_version=18,
                          input_names=["input"])
        want = q(x)
    external = tmp_path / "external" / "layer.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(tmp_path / "layer.onnx")), str(external), save_as_external_data=True,
              location="layer.onnx.data", size_threshold=0)  # every initializer, zero points too
    cpu = ["CPUExecutionProvider"]
    sessions = [ort.InferenceSession(str(tmp_path / "layer.onnx"), providers=cpu),
                inference_session(tmp_path / "layer.onnx", ort.SessionOptions(), cpu),
                inference_session(external, ort.SessionOptions(), cpu)]
    assert [n.op_type for n in onnx.load(str(tmp_path / "layer.onnx")).graph.node].count("QuantizeLinear") >= 2
    outs = [s.run(None, {"input": x.numpy()})[0] for s in sessions]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[1], outs[2])
    got = torch.from_numpy(outs[1])
    if isinstance(layer, torch.nn.Linear):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        return
    step = float(q[0].output_quantizer.amax) / 127
    diff = (got - want).abs()
    assert diff.max() <= step * 1.001, f"{diff.max() / step:.3f} output steps apart"
    assert (diff > step / 2).float().mean() < 0.01


class _Toy(torch.nn.Module):
    """The layer kinds the heavy graphs have, in the orders they have them: a convolution into
    GroupNorm and SiLU, a residual, a transposed convolution, nearest upsampling into a
    convolution (the VAE decoder's and UNet's upsamplers), a Linear on one vector per picture
    (a Gemm, as the timestep embedding's), Linear layers on a token sequence (SmoothQuant scales
    the Linears' inputs), a 1x1 convolution out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.emb = torch.nn.Linear(4, 32)
        self.norm = torch.nn.GroupNorm(8, 32)
        self.conv = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        self.conv_up = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.proj = torch.nn.Linear(32, 32)
        self.ff = torch.nn.Linear(32, 64)
        self.conv_out = torch.nn.Conv2d(64, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.emb(x.mean((2, 3)))[:, :, None, None]
        h = self.up(self.conv(torch.nn.functional.silu(self.norm(h))) + h)
        h = self.conv_up(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")) + h.mean()
        b, c, height, width = h.shape
        t = self.ff(self.proj(h.flatten(2).transpose(1, 2)))
        return self.conv_out(t.transpose(1, 2).reshape(b, 64, height, width))


@needs_modelopt
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_export_writes_what_modelopts_own_export_writes(precision, tmp_path):
    """Our Q/DQ export (the float graph of the module before quantization, from torch's dynamo
    exporter; Q/DQ pairs inserted at the quantizers, SmoothQuant's weights and input scale put
    in: calibration/qdq_export.py) against ModelOpt's own ONNX export of the same
    fake-quantized module (torch's TorchScript exporter). INT8: ONNX Runtime computes the same bits
    from both. FP8 (TensorRT's ops, which ONNX Runtime cannot run): the same scales on the same
    number of Q/DQ pairs. Both: every layer has Q/DQ on its input and weight, the INT8
    convolutions on their output too, and nothing is folded away. INT8's nearest upsampling is
    quantized before it too (the same grid: no bit changes), so that ONNX Runtime resizes 8-bit
    data."""
    import warnings

    import onnxruntime as ort

    from osdiff.calibration.qdq_export import enabled_quantizers, insert_qdq, qdq_layers
    from osdiff.calibration.quantize import Recipe, quantize
    from osdiff.runtime.backends.onnxruntime_int8 import inference_session, uint8_activations

    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 12)
    toy = _Toy().eval()
    q = quantize(toy, [(x,), (torch.randn(2, 4, 12, 12),)], Recipe.fp8() if precision == "fp8" else Recipe())
    quantizers = enabled_quantizers(q)
    assert q.proj.input_quantizer.pre_quant_scale is not None or precision == "fp8"  # SmoothQuant's Mul is exported
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(q, (x,), str(tmp_path / "modelopt.onnx"), dynamo=False, opset_version=18, input_names=["x"])
        ours = torch.onnx.export(toy, (x,), dynamo=True, opset_version=18, input_names=["x"], verbose=False).model_proto
    float_graph = onnx.ModelProto()
    float_graph.CopyFrom(ours)
    assert insert_qdq(ours, q) == []
    onnx.save(ours, str(tmp_path / "ours.onnx"))
    int8 = precision == "int8"
    assert qdq_layers(tmp_path / "ours.onnx") == {
        # INT8: `up`'s output is quantized by conv_up's input quantizer, in front of the upsampling
        name: {"input": True, "weight": True, "output": int8 and (isinstance(m, torch.nn.Conv2d) or name == "up")}
        for name, m in _Toy().named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))}
    if int8:
        # a SmoothQuant-scaled layer (weight W / s) whose input quantizer, which applies s, is off
        import copy
        half = copy.deepcopy(q)
        half.proj.weight_quantizer.disable()
        with pytest.raises(ValueError, match="proj: SmoothQuant-scaled, but only its input quantizer is enabled"):
            insert_qdq(float_graph, half)
        cpu = ["CPUExecutionProvider"]
        sessions = [ort.InferenceSession(str(tmp_path / f), providers=cpu) for f in ("modelopt.onnx", "ours.onnx")]
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")  # what ORT runs
        sessions.append(inference_session(tmp_path / "ours.onnx", options, cpu))  # uint8 activations
        optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
        producer = {o: n.op_type for n in optimized for o in n.output}
        assert [producer[n.input[0]] for n in optimized if n.op_type == "Resize"] == ["QuantizeLinear"]
        got = [s.run(None, {"x": x.numpy()})[0] for s in sessions]
        assert np.array_equal(got[0], got[1]) and np.array_equal(got[1], got[2])
        # the uint8 rewrite leaves no int8 zero point unread (ONNX Runtime warns of each one)
        uint8_activations(ours)
        read = {i for n in ours.graph.node for i in n.input}
        assert [i.name for i in ours.graph.initializer if i.name not in read] == []
        return
    theirs = onnx.load(str(tmp_path / "modelopt.onnx"))
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in theirs.graph.node if n.op_type == "Constant"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in ours.graph.initializer}
    scales = [sorted(float(table[n.input[1]]) for n in model.graph.node if n.op_type == "TRT_FP8QuantizeLinear")
              for model, table in ((theirs, constants), (ours, inits))]
    assert len(scales[0]) == 2 * len(quantizers)
    np.testing.assert_allclose(scales[1], scales[0], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_synthesis_int8(tiny_model):
    """The tiny model's G_s and an INT8 fake-quantized copy (random inputs: the ranges do not
    matter here), with one input to run it on."""
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (pip install -e '.[calibrate]')")
    from osdiff.calibration.quantize import Recipe, quantize
    from osdiff.export.model import graph_shapes

    spec = tiny_model.graphs()["synthesis"]
    shapes = graph_shapes(tiny_model.config, "synthesis", 1, 64, 128)
    torch.manual_seed(0)
    args = [tuple(torch.randn(shapes[i]) for i in spec.inputs) for _ in range(2)]
    return spec, quantize(spec.module, args, Recipe()), args[0]


@needs_modelopt
def test_residual_skips_read_the_quantized_input_in_torch_and_in_the_graph(tiny_model, tiny_export,
                                                                          tiny_synthesis_int8, tmp_path):
    """INT8 (Recipe.quantized_residuals): each ResidualBottleneck adds its input as its first
    convolution's input quantizer gives it. In PyTorch the hook changes the output (it does
    something) and goes with the block's first layer: a block kept float, or the float module
    outside `partly_quantized`, adds its input as it is. In the Q/DQ graph each block's sum reads
    the DequantizeLinear of that convolution's input, and ONNX Runtime computes what the fake
    quantization computes (to the rounding of an integer convolution: mean error within 5 % of
    the fake quantization's own from fp32). FP8 leaves the skips float."""
    import copy

    import onnx
    import onnxruntime as ort

    from osdiff.calibration.qdq_export import export_qdq, layer_of
    from osdiff.calibration.quantize import Recipe, keep_float, partly_quantized, quantize, quantized_residuals
    from osdiff.runtime.backends.onnxruntime_int8 import inference_session

    spec, q, args = tiny_synthesis_int8
    blocks_ = quantized_residuals(q)
    assert blocks_ == [f"decoder.{s}.{i}" for s in ("g_s2", "g_s3") for i in (1, 2, 3)]
    with torch.no_grad():
        ref, fake = spec.module(*args), q(*args)
        plain = copy.deepcopy(q)
        for m in plain.modules():
            m._forward_pre_hooks.clear()
        assert not torch.equal(fake, plain(*args))
        one_float = copy.deepcopy(q)
        keep_float(one_float, spec.module, ["decoder.g_s2.1.branch.0"])
        assert quantized_residuals(one_float) == blocks_[1:]
        with partly_quantized(spec.module, q, ["decoder.g_s2.1.branch.0"]) as partly:
            assert len(partly.decoder.g_s2[1]._forward_pre_hooks) == 1
        assert all(not m._forward_pre_hooks for m in spec.module.modules())
    assert quantized_residuals(quantize(spec.module, [args], Recipe.fp8())) == []

    path = tmp_path / "synthesis_int8.onnx"
    export_qdq(q, tiny_model.config, "synthesis", spec.inputs, tiny_export / "fp32" / "synthesis.onnx", path)
    graph = onnx.load(str(path))
    sums = {layer_of(n): list(n.input) for n in graph.graph.node if n.op_type == "Add" and layer_of(n) in blocks_}
    assert sums.keys() == set(blocks_)
    for block, inputs in sums.items():
        assert f"{block}.branch.0.input.dequantized" in inputs, f"{block}: its sum reads {inputs}"
    (got,) = inference_session(path, ort.SessionOptions(), ["CPUExecutionProvider"]).run(
        None, {i: a.numpy() for i, a in zip(spec.inputs, args)})
    ort_err = float((torch.from_numpy(got) - ref).abs().mean())
    fake_err = float((fake - ref).abs().mean())
    assert abs(ort_err / fake_err - 1) <= 0.05, (ort_err, fake_err)


def test_qdq_export_reads_and_writes_weights_in_side_files(tiny_model, tiny_export, tiny_synthesis_int8, tmp_path,
                                                            monkeypatch):
    """A full-size denoiser's weights are over protobuf's 2 GB, so its float graph lies beside a
    side file and so must its Q/DQ graph. Here the tiny G_s's float graph is read from a side
    file and, with the limit lowered to 0, the Q/DQ graph's weights go to <graph>.onnx.data alone
    (no other file); ONNX Runtime, through the backends' loader, computes the same bits from it
    as from the graph written whole."""
    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    from osdiff.calibration import qdq_export
    from osdiff.runtime.backends.onnxruntime_int8 import inference_session

    spec, q, x = tiny_synthesis_int8
    float_graph = tmp_path / "float" / "synthesis.onnx"
    float_graph.parent.mkdir()
    onnx.save(onnx.load(str(tiny_export / "fp32" / "synthesis.onnx")), str(float_graph), save_as_external_data=True,
              location="synthesis.onnx.data", size_threshold=0)
    whole, side = tmp_path / "whole" / "synthesis.onnx", tmp_path / "side" / "synthesis.onnx"
    qdq_export.export_qdq(q, tiny_model.config, "synthesis", spec.inputs, tiny_export / "fp32" / "synthesis.onnx", whole)
    monkeypatch.setattr(qdq_export, "EXTERNAL_DATA_BYTES", 0)
    qdq_export.export_qdq(q, tiny_model.config, "synthesis", spec.inputs, float_graph, side)
    assert sorted(p.name for p in whole.parent.iterdir()) == ["synthesis.onnx"]
    assert sorted(p.name for p in side.parent.iterdir()) == ["synthesis.onnx", "synthesis.onnx.data"]
    graph = onnx.load(str(side), load_external_data=False).graph
    assert any(uses_external_data(i) and i.name.endswith(".weight.int8") for i in graph.initializer)
    feeds = {n: a.numpy() for n, a in zip(spec.inputs, x)}
    outs = [inference_session(p, ort.SessionOptions(), ["CPUExecutionProvider"]).run(None, feeds)[0]
            for p in (whole, side)]
    assert np.array_equal(outs[0], outs[1])


def test_qdq_export_refuses_quantized_layers_it_cannot_place(tiny_model, tiny_export, tiny_synthesis_int8, tmp_path,
                                                             monkeypatch):
    """A quantized layer that no node of the float graph names would silently stay float
    (here every module path reads back with a prefix, as a wrapper around the module would give):
    export_qdq refuses, naming the layers, since their inputs are not constant. A graph whose
    nodes record no module path at all is refused by insert_qdq, and so is the float graph of
    another model (one weight differs), or another graph of the same model."""
    import copy

    from osdiff.calibration import qdq_export

    spec, q, _ = tiny_synthesis_int8
    fp32 = tiny_export / "fp32"
    real = qdq_export.layer_of
    monkeypatch.setattr(qdq_export, "layer_of", lambda n: None if real(n) is None else f"wrapper.{real(n)}")
    with pytest.raises(ValueError, match=r"synthesis.onnx: quantized layers \['decoder\..*'\] of synthesis have no "
                                         r"node in this float graph, yet their inputs are not constant.*name_scopes"):
        qdq_export.export_qdq(q, tiny_model.config, "synthesis", spec.inputs, fp32 / "synthesis.onnx",
                              tmp_path / "s.onnx")
    monkeypatch.undo()
    stripped = onnx.load(str(fp32 / "synthesis.onnx"))
    for n in stripped.graph.node:
        del n.metadata_props[:]
    with pytest.raises(ValueError, match="no node of the graph records the module it was exported from"):
        qdq_export.insert_qdq(stripped, q)
    other = copy.deepcopy(q)
    layer = next(iter(qdq_export.enabled_quantizers(other)))
    with torch.no_grad():
        other.get_submodule(layer).weight[0].mul_(1.01)
    with pytest.raises(ValueError, match=rf"{layer}\.weight: the float graph's Conv weight \[.*\] holds other values "
                                         "than the module's"):
        qdq_export.insert_qdq(onnx.load(str(fp32 / "synthesis.onnx")), other)
    with pytest.raises(ValueError, match="vae_decoder.onnx: quantized layers .* of synthesis have no node in this "
                                         "float graph"):
        qdq_export.export_qdq(q, tiny_model.config, "synthesis", spec.inputs, fp32 / "vae_decoder.onnx",
                              tmp_path / "s.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((fp32 / "synthesis.onnx").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated.onnx: not a readable ONNX graph \(DecodeError"):
        qdq_export.export_qdq(q, tiny_model.config, "synthesis", spec.inputs, truncated, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.slow
@needs_modelopt
def test_onnx_runtime_int8_graphs_lose_what_fake_quantization_loses(calibrated, builtin, calibration_set):
    """As the tiny model's test, on the built-in model's graphs and their real inputs (ONNX
    Runtime's integer kernels against ModelOpt's fake quantization, same tolerance)."""
    _assert_ort_int8_loses_what_fake_quantization_loses(builtin, calibration_set.validation, *calibrated)


@pytest.mark.slow
@needs_modelopt
def test_fp32_stream_decodes_with_int8_within_the_measured_loss(calibrated, builtin, calibration_set):
    """Streams of the fp32 export decode with the INT8 one (the stream's check value proves
    every symbol was read as written), and the pixels lose what calibration measures (fake
    quantization of the three decode graphs, the same validation pictures and seeds), give or
    take 0.1 dB."""
    from osdiff.calibration.pipeline import decode_with, quality, run_fp32
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.codec import Codec

    out, result = calibrated
    fp32, int8 = Codec(OnnxRuntimeBackend(out)), Codec(OnnxRuntimeBackend(out, precision="int8"))
    refs, decoded, originals = [], [], []
    for i, crop in enumerate(calibration_set.validation):
        stream = fp32.compress(crop.pixels, seed=i)
        refs.append(fp32.decompress(stream))
        decoded.append(int8.decompress(stream))
        originals.append(crop.pixels)
        fp32.decompress(int8.compress(crop.pixels, seed=i))  # and an INT8 encoder's stream decodes in fp32
    got = quality(decoded, refs, originals)
    run = run_fp32(builtin, calibration_set.validation)
    fake, _ = decode_with(builtin, run, {g: result.modules[g] for g in ("synthesis", "denoiser", "vae_decoder")})
    want = quality(fake, run.decoded, originals)
    assert abs(got["psnr_drop_db"] - want["psnr_drop_db"]) <= 0.1, \
        f"ONNX Runtime INT8 lost {got['psnr_drop_db']:.3f} dB, fake quantization {want['psnr_drop_db']:.3f} dB"


def test_cli_int8_needs_onnxruntime(tmp_path):
    from click.testing import CliRunner

    from osdiff.cli import main

    r = CliRunner().invoke(main, ["decompress", str(Path(__file__)), "-o", str(tmp_path), "--config", "demo",
                                  "--precision", "int8"])
    assert r.exit_code == 2 and "--precision int8 runs the calibrated graphs of an export" in r.output


@needs_modelopt
def test_cli_calibrate_refuses_a_folder_that_is_not_an_export_first(tmp_path):
    """--engines must be an `osdiff export` directory: said before the images and the model load."""
    from click.testing import CliRunner

    from osdiff.cli import main

    r = CliRunner().invoke(main, ["calibrate", "--config", "demo", "--engines", str(tmp_path)])
    assert r.exit_code == 1
    assert "no readable manifest.json" in r.output and "`osdiff export -o DIR`" in r.output
    assert "ranges from" not in r.output  # the calibration images were not read


@needs_modelopt
def test_calibrate_refuses_a_replaced_or_missing_fp32_graph_first(tiny_model, tiny_export, tiny_crops, tmp_path):
    """The Q/DQ graphs are written from the export's fp32 graphs: one replaced by another file
    (here the VAE decoder's copied over G_s's) or missing is refused, naming it, before the
    codec runs on a single image, and nothing is written."""
    from osdiff.calibration.calibrate import Settings, calibrate
    from osdiff.export.onnx_export import ExportError

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    manifest = (out / "manifest.json").read_text()
    shutil.copy(out / "fp32" / "vae_decoder.onnx", out / "fp32" / "synthesis.onnx")
    said: list[str] = []
    with pytest.raises(ExportError, match=r"fp32/synthesis.onnx: not the file the export wrote \(its sha256"):
        calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False), echo=said.append)
    (out / "fp32" / "synthesis.onnx").unlink()
    with pytest.raises(ExportError, match=r"fp32/synthesis.onnx: missing; re-export with `osdiff export`"):
        calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False), echo=said.append)
    edited = json.loads(manifest)
    del edited["graphs"]["synthesis"]  # an `osdiff export --only ...`
    (out / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ExportError, match=r"has no fp32 graph 'synthesis' to write its quantized graph from"):
        calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False), echo=said.append)
    edited = json.loads(manifest)
    edited["graphs"]["denoiser"]["attention"] = "scan"
    (out / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ExportError, match=r"denoiser's attention was exported as a Scan.*--attention mha"):
        calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False, graphs=("denoiser",)), echo=said.append)
    (out / "manifest.json").write_text(manifest)
    assert said == []
    assert not (out / "int8").exists() and (out / "manifest.json").read_text() == manifest


@needs_modelopt
def test_calibration_that_fails_while_writing_leaves_the_export_as_it_was(tiny_model, tiny_export, tiny_crops,
                                                                         tmp_path, monkeypatch):
    """The Q/DQ graphs are written aside and moved into the export only once every one of them is:
    a failure at the second graph (an exporter error, an interrupt) leaves no INT8 file, no staging
    folder and the manifest untouched. A later calibration that succeeds removes a stale side
    file, so that the manifest's sha256 is the graph's."""
    from osdiff.calibration import calibrate as calibrate_module
    from osdiff.calibration.calibrate import STAGING, Settings, calibrate
    from osdiff.export.onnx_export import _sha256

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    manifest = (out / "manifest.json").read_text()
    real = calibrate_module.export_qdq
    written: list[Path] = []

    def fail_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        if written:
            raise KeyboardInterrupt
        written.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "export_qdq", fail_second)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False, graphs=("synthesis", "vae_encoder")),
                  accept_loss=True, echo=lambda s: None)
    assert written and written[0].is_relative_to(out / STAGING)
    assert not (out / "int8").exists() and not (out / STAGING).exists()
    assert (out / "manifest.json").read_text() == manifest and not (out / "calibration.json").exists()
    # once it succeeds, a side file an earlier calibration left beside a graph is gone (it would
    # count in the graph's sha256)
    monkeypatch.undo()
    (out / "int8").mkdir()
    (out / "int8" / "synthesis.onnx.data").write_bytes(b"stale")
    calibrate(tiny_model, out, tiny_crops, Settings(sensitivity=False, graphs=("synthesis",)), accept_loss=True,
              echo=lambda s: None)
    entry = json.loads((out / "manifest.json").read_text())["graphs"]["synthesis"]["int8"]
    assert not (out / "int8" / "synthesis.onnx.data").exists() and not (out / STAGING).exists()
    assert _sha256(out / entry["file"]) == entry["sha256"]
