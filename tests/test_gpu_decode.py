"""The decode path on CUDA, as designed for the GPU: one wait per entropy round and no other,
entropy-model graphs in true fp32 (no TF32), CUDA graphs that share one memory pool. Needs a
CUDA GPU: skipped elsewhere with the reason printed; benchmarks/gpu_check.sh runs them first
thing on a lent GPU machine. (The same code runs on the CPU in every codec test.)"""

from __future__ import annotations

import pytest
import torch

from osdiff.calibration.precision import FP16_GRAPHS
from osdiff.export.model import OSDiffModel, graph_shapes
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.bitstream import OsdStream
from osdiff.runtime.codec import Codec
from osdiff.runtime.latent_codec import CodedLatent, decompress_latent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here"),
]


def fresh(tiny_dir, tiny_config) -> OSDiffModel:
    """A backend moves and casts the model it is given: each gets its own."""
    return OSDiffModel.load(tiny_dir / "sd21_tiny.ckpt", tiny_dir / "osdiff_tiny.ckpt", tiny_config)


def random_inputs(cfg, backend: TorchBackend, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, graph in backend.graphs.items():
        shapes = graph_shapes(cfg, name, 1, 128, 192)
        out[name] = [torch.randn(shapes[i], generator=g) for i in graph.inputs]
    return out


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_decode_waits_once_per_round_and_nowhere_else(tiny_dir, tiny_config, tiny_image, monkeypatch, cuda_graphs):
    model = fresh(tiny_dir, tiny_config)
    backend = TorchBackend(model, device="cuda", cuda_graphs=cuda_graphs)
    codec = Codec(backend)
    stream = OsdStream.from_bytes(codec.compress(tiny_image))
    f = tiny_config.pad_multiple
    hp, wp = codec.padded_size(*tiny_image.shape[:2])

    def decode() -> torch.Tensor:
        coded = CodedLatent(stream.z_string, stream.y_string, (hp // f, wp // f), [])
        return decompress_latent(backend, tiny_config, model.entropy_bottleneck, model.gaussian, coded)

    expected = decode()  # warm-up: cuDNN's choices, graph captures, the page-locked buffers
    waits = []
    wait = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: (waits.append(1), wait(self))[1])
    torch.cuda.set_sync_debug_mode("error")  # any implicit synchronization raises
    try:
        y_hat = decode()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert len(waits) == 2 * len(tiny_config.lfgcm.slice_ch)
    assert torch.equal(y_hat, expected)


def test_entropy_model_graphs_run_in_true_fp32(tiny_model, tiny_dir, tiny_config):
    """Against the CPU: TF32 convolutions (cuDNN's default on Ampere and later) would be ~1e-3
    off and move CDF indexes; fp32 is off by rounding only. Also inside captured graphs and
    next to fp16 stages."""
    cpu = TorchBackend(tiny_model)
    gpu = TorchBackend(fresh(tiny_dir, tiny_config), device="cuda", half=True, channels_last=True, cuda_graphs=True)
    inputs = random_inputs(tiny_config, cpu)
    for name in cpu.graphs:
        if name in FP16_GRAPHS:
            continue
        for _ in range(2):  # capture, then replay
            for o, r in zip(gpu.run(name, *inputs[name]), cpu.run(name, *inputs[name])):
                rel = float((o.cpu() - r).abs().max() / r.abs().max())
                assert rel < 2e-5, (name, rel)


def test_captured_graphs_share_one_pool_and_replay_in_any_order(tiny_dir, tiny_config):
    eager = TorchBackend(fresh(tiny_dir, tiny_config), device="cuda")
    graphs = TorchBackend(fresh(tiny_dir, tiny_config), device="cuda", cuda_graphs=True)
    inputs = random_inputs(tiny_config, graphs, seed=1)
    names = list(graphs.graphs)
    for name in names:  # captured in pipeline order ...
        graphs.run(name, *inputs[name])
    outputs = {name: graphs.run(name, *inputs[name]) for name in reversed(names)}  # ... replayed backwards
    for name in names:
        for o, r in zip(outputs[name], eager.run(name, *inputs[name])):
            assert torch.allclose(o, r, rtol=1e-5, atol=1e-6 * float(r.abs().max())), name
