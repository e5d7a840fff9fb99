"""Attention in every form the engine runs (export/models/attention.py): PyTorch's single SDPA call
where its kernel is memory-linear, query blocks where it is not, and the exported forms
(ONNX Runtime's MultiHeadAttention, the plain pattern TensorRT fuses, the Scan fallback), each
against SDPA itself."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from osdiff.export.models import attention
from osdiff.export.models.attention import FORMS, export_form, onnx_translation, plain_attention


def _reference(q, k, v, heads):
    """B x S x (h d) layout in and out, through SDPA on B x h x S x d."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


class _CountingSDPA:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counted)


def _qkv(b=2, s=500, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, d, generator=g) for _ in range(3))


# ---------------------------------------------------------------------------------------------
# PyTorch: which path runs
# ---------------------------------------------------------------------------------------------


def test_one_call_where_the_kernel_is_memory_linear(monkeypatch):
    """The CPU flash kernel (forced, so the test does not depend on SDPA's heuristics) never
    holds the scores: one call, however small the block budget."""
    q, k, v = _qkv()
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 2 * 2 * 500 * 7)  # 7-query blocks if blocks ran
    counter = _CountingSDPA(monkeypatch)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        assert attention.memory_linear_kernel(*(t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v)))
        out = attention.attention(q, k, v, heads=2)
    assert counter.calls == 1
    assert float((out - _reference(q, k, v, 2)).abs().max()) <= 1e-6


def test_blocks_where_sdpa_would_materialize_the_scores(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 2 * 2 * 500 * 7)
    counter = _CountingSDPA(monkeypatch)
    with sdpa_kernel([SDPBackend.MATH]):
        assert not attention.memory_linear_kernel(*(t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v)))
        out = attention.attention(q, k, v, heads=2)
        ref = _reference(q, k, v, 2)
    assert counter.calls == math.ceil(500 / 7) + 1  # the blocks, then the reference's own call
    assert float((out - ref).abs().max()) <= 1e-6


def test_math_kernel_within_the_budget_is_one_call(monkeypatch):
    q, k, v = _qkv(s=50)
    counter = _CountingSDPA(monkeypatch)
    with sdpa_kernel([SDPBackend.MATH]):
        attention.attention(q, k, v, heads=2)
    assert counter.calls == 1


def test_always_query_blocks_splits_even_a_flash_call(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 2 * 2 * 500 * 100)  # 100-query blocks
    counter = _CountingSDPA(monkeypatch)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), attention.always_query_blocks():
        out = attention.attention(q, k, v, heads=2)
    assert counter.calls == 5
    assert float((out - _reference(q, k, v, 2)).abs().max()) <= 1e-6


def test_the_vae_layout_reaches_the_flash_kernel():
    """The VAE's B x HW x C view of a B x C x H x W tensor is not contiguous in C; SDPA's CPU
    flash kernel refuses such inputs, so attention() makes them contiguous first."""
    x = torch.randn(1, 64, 12, 10)
    t = x.flatten(2).transpose(1, 2)
    assert t.stride(-1) != 1
    one_head = t.unflatten(-1, (1, -1)).transpose(1, 2)
    assert not attention.memory_linear_kernel(one_head, one_head, one_head)
    split = attention._split_heads(t, 1)
    assert attention.memory_linear_kernel(split, split, split)
    assert torch.equal(attention.attention(t, t, t, 1), _reference(t.contiguous(), t.contiguous(), t.contiguous(), 1))


def test_the_memory_estimate_counts_blocks_on_the_meta_device():
    """runtime/memory.py runs the stages on the meta device, where SDPA answers its math kernel:
    the estimate holds the blocks' scores (at most CHUNK_BYTES), an upper bound of a fused kernel."""
    m = torch.empty(1, 1, 100, 64, device="meta")
    assert not attention.memory_linear_kernel(m, m, m)


@pytest.mark.parametrize("n", [1, 35, 1230])
def test_the_scan_pads_less_than_one_block_and_never_past_n(n):
    """The Scan form's query blocks hold at most N queries, however small N is next to what
    CHUNK_BYTES allows (a block of CHUNK_BYTES padded onto a small image cost 18 GB)."""
    q = torch.randn(1, 2, n, 8)
    blocks = attention.query_blocks(q, n)
    count, block = blocks.shape[0], blocks.shape[3]
    assert block <= n and (count - 1) * block < n <= count * block
    assert torch.equal(blocks.permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :n], q)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="attention form must be one of"):
        with export_form("flash"):
            pass


# ---------------------------------------------------------------------------------------------
# Exported graphs
# ---------------------------------------------------------------------------------------------


class _Blocks(torch.nn.Module):
    """The two attentions of the model: the VAE's single head over all positions of a
    B x C x H x W map, and the UNet's multi-head cross-attention to a 77-token-like context."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Conv2d(16, 16, 1) for _ in range(3))
        self.to_k, self.to_v = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)

    def forward(self, x, context):
        q, k, v = (conv(x).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # B x HW x 16
        a = attention.attention(q, k, v, heads=1)
        b = attention.attention(q, self.to_k(context), self.to_v(context), heads=4)
        return (a + b).transpose(1, 2).reshape(x.shape)


def _export(form, tmp_path, half=False):
    module = _Blocks().eval()
    if half:
        module = module.half()
    x, c = torch.randn(2, 16, 12, 10), torch.randn(2, 7, 8)
    if half:
        x, c = x.half(), c.half()
    auto = torch.export.Dim.AUTO
    with export_form(form), torch.no_grad():
        program = torch.onnx.export(module, (x, c), dynamo=True, opset_version=18, input_names=["x", "context"],
                                    output_names=["y"], dynamic_shapes=({0: auto, 2: auto, 3: auto}, {0: auto}),
                                    custom_translation_table=onnx_translation(), verbose=False)
    path = tmp_path / f"{form}.onnx"
    program.save(str(path))
    if form == "plain":
        model = onnx.load(str(path))
        assert plain_attention(model) == 2
        onnx.save(model, str(path))
    return module, path


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("form", FORMS)
def test_every_exported_form_is_the_same_attention(form, tmp_path, monkeypatch):
    """Each form matches SDPA at sizes it was not traced at, and holds what its runtime fuses."""
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 2 * 300 * 64)  # small blocks for the Scan
    module, path = _export(form, tmp_path)
    ops = _ops(path)
    if form == "mha":
        assert ops.count("MultiHeadAttention") == 2 and not {"Scan", "Loop", "Softmax"} & set(ops)
    elif form == "plain":
        assert ops.count("Softmax") == 2 and not {"Scan", "Loop", "MultiHeadAttention"} & set(ops)
    else:
        assert "Scan" in ops and "Softmax" not in ops  # the scores live inside the loop only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 16, 5, 7), (3, 16, 30, 41)]:  # 35 positions, and 1230: many Scan blocks
        x, c = torch.randn(shape), torch.randn(shape[0], 7, 8)
        with torch.no_grad():
            ref = module(x, c)
        (y,) = session.run(None, {"x": x.numpy(), "context": c.numpy()})
        assert float((torch.from_numpy(y) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("form", ["mha", "plain"])
def test_fp16_graphs_keep_attention_in_fp16(form, tmp_path):
    """ONNX Runtime's MultiHeadAttention has float16 kernels on the CPU too; the plain rewrite
    writes its scale in the graph's dtype."""
    module, path = _export(form, tmp_path, half=True)
    model = onnx.load(str(path))
    if form == "plain":
        scales = [i for i in model.graph.initializer if i.name.endswith("/scale")]
        assert scales and all(i.data_type == onnx.TensorProto.FLOAT16 for i in scales)
    x, c = torch.randn(1, 16, 9, 11), torch.randn(1, 7, 8)
    with torch.no_grad():
        ref = module.float()(x, c)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.half().numpy(), "context": c.half().numpy()})
    assert np.abs(y.astype(np.float32) - ref.numpy()).max() <= 5e-3 * float(ref.abs().max())


def test_plain_rewrite_refuses_what_it_does_not_understand(tmp_path):
    _, path = _export("mha", tmp_path)
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    node.input.append("mask")
    with pytest.raises(ValueError, match="only q, k, v"):
        plain_attention(model)


def test_tensorrt_gets_no_loops_and_no_contrib_ops(tmp_path):
    """engine/prepare.py: an mha graph becomes the plain pattern (and still matches); a Scan
    graph is refused with the way out."""
    # the GPU machine's image lacks Polygraphy (make test-gpu-image), and builds no engine there
    pytest.importorskip("polygraphy", reason="Polygraphy (engine/prepare.py) is not installed")
    from osdiff.engine.prepare import PrepareError, prepare_onnx

    module, mha = _export("mha", tmp_path)
    prepared = tmp_path / "prepared.onnx"
    prepare_onnx(mha, prepared)
    ops = _ops(prepared)
    assert "Softmax" in ops and not {"Scan", "Loop", "MultiHeadAttention"} & set(ops)
    x, c = torch.randn(1, 16, 8, 6), torch.randn(1, 7, 8)
    (y,) = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "context": c.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x, c).numpy(), rtol=1e-5, atol=1e-5)
    _, scan = _export("scan", tmp_path)
    with pytest.raises(PrepareError, match="--attention mha"):
        prepare_onnx(scan, tmp_path / "refused.onnx")


def test_torch_compile_keeps_one_sdpa_and_matches_eager():
    """Under torch.compile the path is decided by what is being done (compiling), not by
    torch.compiler.is_exporting(), which answers True inside torch.compile on torch 2.11."""
    module = _Blocks().eval()
    x, c = torch.randn(1, 16, 6, 5), torch.randn(1, 7, 8)
    with torch.no_grad():
        eager = module(x, c)
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(x, c)
    assert float((compiled - eager).abs().max()) <= 1e-6 * float(eager.abs().max()) + 1e-7
