"""The PyTorch CUDA backend (fp16, channels_last, CUDA graphs). Needs a CUDA GPU: on machines
without one these tests are skipped, with the reason printed in the summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel, graph_shapes
from osdiff.files import psnr
from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.bitstream import StreamError
from osdiff.runtime.codec import Codec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here"),
]


def fresh(tiny_dir, tiny_config) -> OSDiffModel:
    """A backend moves and casts the model it is given: each gets its own."""
    return OSDiffModel.load(tiny_dir / "sd21_tiny.ckpt", tiny_dir / "osdiff_tiny.ckpt", tiny_config)


def test_cuda_graphs_and_fp32_match_the_cpu(tiny_model, tiny_dir, tiny_config):
    cpu = TorchBackend(tiny_model)
    eager = TorchBackend(fresh(tiny_dir, tiny_config), device="cuda")
    graphs = TorchBackend(fresh(tiny_dir, tiny_config), device="cuda", cuda_graphs=True)
    for name, g in cpu.graphs.items():
        s = graph_shapes(tiny_model.config, name, 1, 128, 192)
        inputs = [torch.rand(s[i]) for i in g.inputs]
        ref = cpu.run(name, *inputs)
        for backend in (eager, graphs, graphs):  # the second graph call replays
            for o, r in zip(backend.run(name, *inputs), ref):
                assert float((o.cpu() - r).abs().max() / r.abs().max()) < 1e-4, name


def test_streams_from_cpu_backends_decode_on_the_gpu(tiny_model, tiny_export, tiny_dir, tiny_config, capsys):
    """The cross-device matrix: CPU-made streams decoded on CUDA in fp32 and fp16. A stream
    either decodes to (nearly) the CPU's image or raises StreamError, never a wrong image."""
    from test_codec import images

    cpu = {"torch cpu": Codec(TorchBackend(tiny_model)), "onnxruntime cpu": Codec(OnnxRuntimeBackend(tiny_export))}
    gpu = {"cuda fp32": Codec(TorchBackend(fresh(tiny_dir, tiny_config), device="cuda")),
           "cuda fp16 + graphs": Codec(TorchBackend(fresh(tiny_dir, tiny_config), device="cuda", half=True,
                                                    channels_last=True, cuda_graphs=True))}
    matrix = {}
    for enc_name, enc in cpu.items():
        for dec_name, dec in gpu.items():
            ok = 0
            for i, image in enumerate(images(20)):
                data = enc.compress(image, seed=i)
                try:
                    out = dec.decompress(data)
                except StreamError:
                    continue
                ok += 1
                assert psnr(out, enc.decompress(data)) > (40 if "fp32" in dec_name else 25)
            matrix[f"{enc_name} -> {dec_name}"] = ok
    with capsys.disabled():
        print("\nsymbol-exact decodes of 20 streams:", matrix)


def test_fp16_against_fp32_on_the_full_model(capsys):
    fp32_codec = Codec(TorchBackend(OSDiffModel.random(ModelConfig.full(), seed=0), device="cuda"))
    image = np.random.default_rng(0).integers(0, 256, (512, 768, 3)).astype(np.uint8)
    data = fp32_codec.compress(image)
    fp32 = fp32_codec.decompress(data)
    fp16 = Codec(TorchBackend(OSDiffModel.random(ModelConfig.full(), seed=0), device="cuda", half=True,
                              channels_last=True, cuda_graphs=True)).decompress(data)
    value = psnr(fp16, fp32)
    with capsys.disabled():
        print(f"\nfull size, 512x768, random weights: fp16 + CUDA graphs vs fp32 PSNR {value:.1f} dB")
    assert value > 30
