"""The command line: what a user types, what they get back, what is left on disk."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from osdiff.cli import main
from osdiff.files import read_image


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_image):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(tiny_image).save(d / "photo.png")
    Image.fromarray(tiny_image[:100, :150]).save(d / "crop.jpg", quality=90)
    Image.fromarray(tiny_image[:70, :90, 0]).save(d / "gray.png")
    rgba = np.concatenate([tiny_image[:64, :64], np.full((64, 64, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(d / "alpha.png")
    (d / "broken.png").write_text("not an image")
    return d


def test_compress_with_onnxruntime_then_decompress_with_torch(inputs, tiny_export, tiny_dir, tmp_path):
    names = ["photo.png", "crop.jpg", "gray.png", "alpha.png"]
    result = run("compress", *(inputs / n for n in names), "-o", tmp_path / "streams", "--engines", tiny_export)
    assert result.output.count("bpp") == 4 and "[4/4]" in result.output
    streams = sorted((tmp_path / "streams").glob("*.osd"))
    assert [s.stem for s in streams] == sorted(n.split(".")[0] for n in names)
    result = run("decompress", *streams, "-o", tmp_path / "out", "--sd", tiny_dir / "sd21_tiny.ckpt",
                 "--osdiff", tiny_dir / "osdiff_tiny.ckpt", "--config", tiny_dir / "config.json")
    for n in names:
        original, decoded = read_image(inputs / n), read_image(tmp_path / "out" / (n.split(".")[0] + ".png"))
        assert decoded.shape == original.shape


def test_one_bad_file_fails_alone_and_leaves_nothing_behind(inputs, tiny_export, tmp_path):
    result = run("compress", inputs / "broken.png", inputs / "photo.png", "-o", tmp_path, "--engines", tiny_export, ok=False)
    assert result.exit_code == 1
    assert "broken.png: error: " in result.output and "not a readable image" in result.output
    assert "1 of 2 file(s) failed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.osd"]


def test_a_corrupt_stream_gives_an_error_and_no_image(inputs, tiny_export, tmp_path):
    run("compress", inputs / "photo.png", "-o", tmp_path / "a.osd", "--engines", tiny_export)
    data = bytearray((tmp_path / "a.osd").read_bytes())
    data[40] ^= 0x10
    (tmp_path / "a.osd").write_bytes(bytes(data))
    result = run("decompress", tmp_path / "a.osd", "-o", tmp_path / "a.png", "--engines", tiny_export, ok=False)
    assert result.exit_code == 1 and "error:" in result.output
    assert not (tmp_path / "a.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.osd"]  # no temporary file left either


def test_reference_format(inputs, tiny_export, tiny_dir, tmp_path):
    run("compress", inputs / "photo.png", "-o", tmp_path / "s.bin", "--format", "reference", "--engines", tiny_export)
    assert (tmp_path / "s.bin").read_bytes() == (tiny_dir / "stream.bin").read_bytes()
    assert "needs --size" in run("decompress", tmp_path / "s.bin", "-o", tmp_path / "s.png", "--format", "reference",
                                 "--engines", tiny_export, ok=False).output
    result = run("decompress", tmp_path / "s.bin", "-o", tmp_path / "s.png", "--format", "reference", "--size",
                 "128x192", "--engines", tiny_export)
    assert read_image(tmp_path / "s.png").shape == (128, 192, 3)
    assert "128x192 (HxW)" in result.output  # sizes are printed in the order --size takes them


def test_either_coder_writes_the_same_stream_and_reads_the_other(inputs, tiny_export, tmp_path):
    from osdiff.runtime.coder import current_coder, use_coder

    run("compress", inputs / "photo.png", "-o", tmp_path / "native.osd", "--engines", tiny_export)
    try:
        run("--coder", "compressai", "compress", inputs / "photo.png", "-o", tmp_path / "compressai.osd",
            "--engines", tiny_export)
        assert current_coder() == "compressai"
        run("--coder", "compressai", "decompress", tmp_path / "native.osd", "-o", tmp_path / "by_compressai.png",
            "--engines", tiny_export)
    finally:
        use_coder("native")
    assert (tmp_path / "native.osd").read_bytes() == (tmp_path / "compressai.osd").read_bytes()
    run("decompress", tmp_path / "compressai.osd", "-o", tmp_path / "by_native.png", "--engines", tiny_export)
    assert np.array_equal(read_image(tmp_path / "by_native.png"), read_image(tmp_path / "by_compressai.png"))
    assert "Invalid value" in run("--coder", "fast", "decompress", tmp_path / "native.osd", "-o", tmp_path / "x.png",
                                  "--engines", tiny_export, ok=False).output


def test_usage_errors(inputs, tiny_dir, tmp_path):
    out = run("compress", inputs / "photo.png", "-o", tmp_path, ok=False).output
    assert "give --sd and --osdiff" in out
    out = run("compress", inputs / "photo.png", "-o", tmp_path, "--random-weights", "--sd", tiny_dir / "sd21_tiny.ckpt", ok=False).output
    assert "takes no checkpoints" in out
    out = run("compress", inputs / "photo.png", "-o", tmp_path, "--backend", "onnxruntime", ok=False).output
    assert "needs --engines" in out
    out = run("export", "--sd", tiny_dir / "osdiff_tiny.ckpt", "--osdiff", tiny_dir / "sd21_tiny.ckpt", "-o", tmp_path, ok=False).output
    assert "swapped" in out
    (tmp_path / "s.bin").write_bytes(b"\0" * 64)
    for size, message in [("512", "must be HxW"), ("512x", "must be HxW"), ("0x768", "must be positive"),
                          ("-512x768", "must be positive")]:
        out = run("profile", "--random-weights", "--size", size, ok=False).output
        assert message in out and "--size" in out, (size, out)
        out = run("decompress", tmp_path / "s.bin", "-o", tmp_path / "s.png", "--format", "reference", "--size", size,
                  ok=False).output
        assert message in out, (size, out)


def test_export_command_writes_the_graphs_it_is_asked_for(tiny_dir, tmp_path):
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    result = run("export", "--sd", tiny_dir / "sd21_tiny.ckpt", "--osdiff", tiny_dir / "osdiff_tiny.ckpt",
                 "--config", tiny_dir / "config.json", "-o", tmp_path, "--only", "analysis", "--only", "synthesis")
    assert "[1/2] analysis fp32" in result.output and "[2/2] synthesis fp16" in result.output
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == ["analysis.onnx", "synthesis.onnx"]
    # fp16 runs the fp16 synthesis, and the LFGCM's analysis in fp32, by design
    backend = OnnxRuntimeBackend(tmp_path, precision="fp16")
    assert backend.variants["synthesis"]["file"] == "fp16/synthesis.onnx"
    assert backend.variants["analysis"]["file"] == "fp32/analysis.onnx"


def test_a_precision_the_export_lacks_is_an_error(tiny_dir, inputs, tmp_path):
    """Not a silent fp32 run: the error names the graph and how to export it."""
    from osdiff.export.onnx_export import ExportError
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.serving.repository import RepositoryOptions, write_repository

    export = tmp_path / "fp32-only"
    run("export", "--sd", tiny_dir / "sd21_tiny.ckpt", "--osdiff", tiny_dir / "osdiff_tiny.ckpt", "--config",
        tiny_dir / "config.json", "-o", export, "--only", "analysis", "--only", "synthesis", "--no-fp16")
    assert OnnxRuntimeBackend(export, precision="fp32").variants["synthesis"]["file"] == "fp32/synthesis.onnx"
    with pytest.raises(ExportError) as e:
        OnnxRuntimeBackend(export, precision="fp16")
    message = str(e.value)
    assert "no fp16 variant of 'synthesis' (" in message and "'analysis'" not in message
    assert "--no-fp16" in message and "fp32 by design" in message
    out = run("compress", inputs / "photo.png", "-o", tmp_path / "x.osd", "--engines", export, "--precision", "fp16",
              ok=False).output
    assert "no fp16 variant of 'synthesis'" in out and not (tmp_path / "x.osd").exists()
    with pytest.raises(ExportError, match="no fp16 variant of 'synthesis'"):
        write_repository(export, tmp_path / "repo", RepositoryOptions(precision="fp16"))
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = run("demo", "-o", tmp_path)
    assert "the built-in model" in result.output
    for line in ("bpp", "PSNR", "vae_decoder", "entropy coder"):
        assert line in result.output
    for name in ("demo.osd", "input.png", "decoded.png", "side_by_side.png", "onnx/manifest.json"):
        assert (tmp_path / name).exists()
    side = read_image(tmp_path / "side_by_side.png")
    image = read_image(tmp_path / "input.png")
    assert side.shape == (image.shape[0], 2 * image.shape[1], 3)
    assert np.array_equal(side[:, : image.shape[1]], image)


def test_compress_says_when_the_vae_ran_in_tiles(tiny_dir, tiny_model, tiny_image, tmp_path, monkeypatch):
    from osdiff.runtime import memory
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec
    from osdiff.runtime.tiling import TileGrid

    monkeypatch.setattr(memory, "process_rss", lambda: 2**30)  # a process that does not grow meanwhile
    m = tiny_model.config.pad_multiple
    image = np.tile(tiny_image, (2, 2, 1))[: 3 * m, : 4 * m]
    Image.fromarray(image).save(tmp_path / "big.png")
    codec = Codec(TorchBackend(tiny_model))
    whole = max(codec.estimate(*image.shape[:2], d, None).total for d in (False, True))
    tiled = max(codec.estimate(*image.shape[:2], d, TileGrid.default(2 * m, m)).total for d in (False, True))
    checkpoints = ["--sd", tiny_dir / "sd21_tiny.ckpt", "--osdiff", tiny_dir / "osdiff_tiny.ckpt",
                   "--config", tiny_dir / "config.json"]
    result = run("compress", tmp_path / "big.png", "-o", tmp_path / "big.osd", *checkpoints,
                 "--max-memory", str((whole + tiled) // 2))
    assert "the VAE ran in" in result.output and "did not fit in memory" in result.output
    result = run("compress", tmp_path / "big.png", "-o", tmp_path / "whole.osd", *checkpoints)
    assert "tiles" not in result.output


def test_several_inputs_need_an_output_directory(inputs, tmp_path):
    """-o with a file's name and several inputs is an error, not a new folder called x.osd."""
    for name in ("x.osd", "x.bin", "x.png", "x.JPG"):
        result = run("compress", inputs / "photo.png", inputs / "crop.jpg", "-o", tmp_path / name, "--random-weights",
                     "--config", "demo", ok=False)
        assert result.exit_code == 2 and "several inputs need an output directory" in result.output, result.output
        assert not (tmp_path / name).exists()
    (tmp_path / "file").write_bytes(b"")
    result = run("decompress", tmp_path / "file", tmp_path / "file", "-o", tmp_path / "file", ok=False)
    assert "several inputs need an output directory" in result.output and "is a file" in result.output


def _checkpoints(tiny_dir):
    return ["--sd", tiny_dir / "sd21_tiny.ckpt", "--osdiff", tiny_dir / "osdiff_tiny.ckpt", "--config", tiny_dir / "config.json"]


STAGES = ("memory_plan", "upload", "vae_encoder", "analysis", "z_coding", "hyper_synthesis", "y_coding", "parse",
          "synthesis", "denoiser", "vae_decoder", "noise", "download")


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_on_a_terminal_and_never_with_quiet(inputs, tiny_dir, tmp_path, monkeypatch, terminal):
    """A stage bar per file on a terminal (stderr forced to be one here), none with --quiet or
    when stderr is not a terminal; the result lines (stdout) in every case, load and per-file
    times apart, the first file marked as the warm-up."""
    from osdiff.cli import common

    monkeypatch.setattr(common, "stderr_is_terminal", lambda: terminal)
    monkeypatch.setattr(common, "PROGRESS_DELAY_S", 0)
    files = (inputs / "photo.png", inputs / "crop.jpg")
    loud = run("compress", *files, "-o", tmp_path / "a", *_checkpoints(tiny_dir))
    quiet = run("compress", *files, "-o", tmp_path / "b", *_checkpoints(tiny_dir), "--quiet")
    for result in (loud, quiet):
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and lines[0].startswith("[1/2]") and lines[1].startswith("[2/2]")
        assert "(first file: includes the warm-up)" in lines[0] and "warm-up" not in lines[1]
    assert "model loaded in" in loud.stderr and "loading checkpoints" in loud.stderr
    shown = [s for s in STAGES if f"photo.png: {s} [" in loud.stderr]
    assert bool(shown) == terminal, loud.stderr
    assert quiet.stderr == ""

    decoded = run("decompress", tmp_path / "a" / "photo.osd", "-o", tmp_path / "photo.png", *_checkpoints(tiny_dir))
    assert bool([s for s in STAGES if f"photo.osd: {s} [" in decoded.stderr]) == terminal
    profiled = run("profile", *_checkpoints(tiny_dir), "--size", "64x64", "--runs", "2", "--warmup", "1")
    bar = profiled.stderr.split("measured runs ...")[-1]  # after the info line: the bar (1 + 1 warm-up, 2 runs)
    assert ("measured runs:" in bar and "/4 [" in bar) == terminal, profiled.stderr
    assert bool([s for s in STAGES if s in bar]) == terminal
    profiled = run("profile", *_checkpoints(tiny_dir), "--size", "64x64", "--runs", "2", "--warmup", "1", "--quiet")
    assert profiled.stderr == "" and "encode (bytes/pixels" in profiled.stdout
