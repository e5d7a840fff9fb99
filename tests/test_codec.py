"""The codec end to end on the tiny reference model: exact strings, any image size, wrong
models and desynchronized decoders caught, the same pixels from every backend."""

from __future__ import annotations

import numpy as np
import pytest

from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel
from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.backends.base import EntropyModels
from osdiff.runtime.bitstream import OsdStream, StreamError
from osdiff.runtime.codec import Codec
from osdiff.runtime.coder import CdfTables
from osdiff.runtime.entropy import GaussianConditional


@pytest.fixture(scope="module")
def torch_codec(tiny_model):
    return Codec(TorchBackend(tiny_model))


@pytest.fixture(scope="module")
def ort_codec(tiny_export):
    return Codec(OnnxRuntimeBackend(tiny_export))


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Varied sizes (most not multiples of 64) and content: noise, gradients, flat, edges."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(33, 200)), int(rng.integers(33, 200))
        kind = i % 4
        if kind == 0:
            img = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            img = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.random(3)
        elif kind == 2:
            img = np.full((h, w, 3), rng.integers(0, 256, 3))
        else:
            img = ((np.arange(h)[:, None] // 7 + np.arange(w)[None, :] // 5) % 2)[..., None] * rng.integers(0, 256, 3)
        out.append(img.astype(np.uint8))
    return out


def test_strings_from_the_input_image_are_the_reference_strings(torch_codec, tiny_image, tiny_dir):
    stream = OsdStream.from_bytes(torch_codec.compress(tiny_image))
    assert stream.y_string == (tiny_dir / "y_string.bin").read_bytes()
    assert stream.z_string == (tiny_dir / "z_string.bin").read_bytes()
    assert (stream.height, stream.width) == tiny_image.shape[:2]


def test_reference_format_round_trip(torch_codec, tiny_model, tiny_image, tiny_dir):
    # with the canonical tables: the same bytes on every machine
    canonical = Codec(TorchBackend(tiny_model), reference_tables="canonical")
    data = canonical.compress_reference(tiny_image)
    assert data == (tiny_dir / "stream.bin").read_bytes()
    # by default the raw format takes the tables the original derives on this CPU
    assert torch_codec.reference_models is torch_codec.models.original
    out = torch_codec.decompress_reference(torch_codec.compress_reference(tiny_image), 128, 192)
    assert out.shape == (128, 192, 3)
    with pytest.raises(StreamError, match="does not fit"):
        torch_codec.decompress_reference(data, 256, 192)


@pytest.mark.parametrize("shape", [(1, 1), (17, 250), (128, 192), (65, 64)])
def test_any_image_size_round_trips(torch_codec, shape):
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.uint8)
    data = torch_codec.compress(image, seed=3)
    out = torch_codec.decompress(data)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, torch_codec.decompress(data)), "decoding is deterministic"


def test_seed_changes_the_picture_not_the_bits(torch_codec, tiny_image):
    a, b = torch_codec.compress(tiny_image, seed=1), torch_codec.compress(tiny_image, seed=2)
    assert OsdStream.from_bytes(a).y_string == OsdStream.from_bytes(b).y_string
    assert not np.array_equal(torch_codec.decompress(a), torch_codec.decompress(b))


def test_other_weights_refuse_the_stream(torch_codec, tiny_image, tiny_config):
    other = Codec(TorchBackend(OSDiffModel.random(tiny_config, seed=5)))
    with pytest.raises(StreamError, match="other model weights"):
        other.decompress(torch_codec.compress(tiny_image))


def test_other_tables_refuse_the_stream(torch_codec, tiny_model, tiny_image):
    """Same weights, one CDF entry derived differently (as by another build): refused up front,
    and the message says that it is the tables."""
    models = tiny_model.entropy_models
    gaussian = GaussianConditional(models.config.entropy)
    rows = [list(row) for row in gaussian.tables.cdfs]
    rows[5][3] += 1
    gaussian.tables = CdfTables(rows, gaussian.tables.offsets)
    backend = TorchBackend(tiny_model)
    backend.models = EntropyModels(models.config, models.entropy_bottleneck, gaussian, models.weights_id)
    assert backend.models.weights_id == models.weights_id and backend.models.tables_id != models.tables_id
    with pytest.raises(StreamError, match="other entropy tables .* derived the CDF tables differently"):
        Codec(backend).decompress(torch_codec.compress(tiny_image))


def test_a_decoder_that_derives_one_index_differently_fails(tiny_model, torch_codec, tiny_image, monkeypatch):
    """Nudge one scale across a CDF-table boundary on the decoder only: the stream is lost,
    and the check value must turn that into an error, not an image."""
    data = torch_codec.compress(tiny_image)
    backend = TorchBackend(tiny_model)
    table = tiny_model.gaussian.scale_table
    run = backend.run

    def skewed(graph, *inputs):
        out = run(graph, *inputs)
        if graph == "entropy_nonanchor_1":
            scales = out[0].clone()
            scales.view(-1)[5] = table[20] if scales.view(-1)[5] < table[10] else table[2]
            out = (scales, *out[1:])
        return out

    monkeypatch.setattr(backend, "run", skewed)
    # either the symbols turn absurd on the way, or the check value catches them at the end
    with pytest.raises(StreamError, match="check value mismatch|corrupt"):
        Codec(backend).decompress(data)


def test_cross_backend_matrix(torch_codec, ort_codec, capsys):
    """Encode with one backend, decode with the other, 20 images each way."""
    counts = {"torch -> onnxruntime": 0, "onnxruntime -> torch": 0}
    same_bytes = 0
    for i, image in enumerate(images(20)):
        from_torch, from_ort = torch_codec.compress(image, seed=i), ort_codec.compress(image, seed=i)
        same_bytes += from_torch == from_ort
        for key, data, decoder in (("torch -> onnxruntime", from_torch, ort_codec), ("onnxruntime -> torch", from_ort, torch_codec)):
            try:
                decoder.decompress(data)
                counts[key] += 1
            except StreamError:
                pass  # a desync must surface as StreamError; anything else fails the test
    with capsys.disabled():
        print(f"\ncross-backend decodes (tiny, 20 images): {counts}; identical streams: {same_bytes}/20")
    assert counts == {"torch -> onnxruntime": 20, "onnxruntime -> torch": 20}


def test_portable_noise_gives_the_same_pixels_on_every_backend(torch_codec, ort_codec, tiny_image):
    data = torch_codec.compress(tiny_image, seed=11)
    a, b = torch_codec.decompress_tensor(data), ort_codec.decompress_tensor(data)
    assert float((a - b).abs().max()) <= 1e-4


def test_random_full_architecture_demo_config_round_trips():
    model = OSDiffModel.random(ModelConfig.demo(), seed=0)
    codec = Codec(TorchBackend(model))
    image = images(1, seed=4)[0]
    data = codec.compress(image)
    assert codec.decompress(data).shape == image.shape
    assert len(data) < image.size  # the random model still compresses
