"""LFGCM networks against the reference goldens, checkpoint key accounting, full-size shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REFERENCE, assert_close_rel
from osdiff.config import LFGCMConfig, ModelConfig
from osdiff.export.checkpoint import STAGE_PREFIXES, to_checkpoint_key
from osdiff.export.models.lfgcm import (
    Analysis,
    EntropyParameters,
    HyperSynthesis,
    Synthesis,
    squeeze_anchor,
    squeeze_nonanchor,
    unsqueeze_anchor,
    unsqueeze_nonanchor,
    unused_key_shapes,
)

STAGES = {"analysis": Analysis, "hyper_synthesis": HyperSynthesis, "entropy_parameters": EntropyParameters,
          "synthesis": Synthesis}
PP = "preprocess_model."
# EntropyBottleneck / GaussianConditional parameters and tables belong to runtime/entropy.py
NOT_OURS = (PP + "entropy_bottleneck.", PP + "gaussian_conditional.")


def stage_state_dict(sd: dict[str, torch.Tensor], stage: str, cfg: LFGCMConfig) -> dict[str, torch.Tensor]:
    """What the loader does: map the stage's checkpoint prefixes, drop the never-called keys."""
    unused = {PP + k for k in unused_key_shapes(cfg)}
    out = {}
    for ckpt_prefix, module_prefix in STAGE_PREFIXES[stage]:
        for key, value in sd.items():
            if key.startswith(ckpt_prefix) and key not in unused:
                out[module_prefix + key[len(ckpt_prefix):]] = value
    return out


@pytest.fixture(scope="module")
def stages(tiny_config, tiny_state_dict) -> dict[str, torch.nn.Module]:
    out = {}
    for stage, cls in STAGES.items():
        module = cls(tiny_config.lfgcm).eval()
        module.load_state_dict(stage_state_dict(tiny_state_dict, stage, tiny_config.lfgcm), strict=True)
        out[stage] = module
    return out


@pytest.fixture(scope="module")
def symbols(tiny_dir):
    return dict(np.load(tiny_dir / "symbols.npz"))


# --- checkerboard ------------------------------------------------------------------------------


def test_checkerboard_squeeze_matches_definition():
    x = torch.randn(2, 3, 6, 8)
    anchor = torch.zeros(2, 3, 6, 4)
    nonanchor = torch.zeros(2, 3, 6, 4)
    for r in range(6):
        a_cols = [c for c in range(8) if (r + c) % 2 == 1]  # anchors: row + column odd
        n_cols = [c for c in range(8) if (r + c) % 2 == 0]
        anchor[:, :, r] = x[:, :, r, a_cols]
        nonanchor[:, :, r] = x[:, :, r, n_cols]
    assert torch.equal(squeeze_anchor(x), anchor)
    assert torch.equal(squeeze_nonanchor(x), nonanchor)

    mask = (torch.arange(6)[:, None] + torch.arange(8)[None, :]) % 2 == 1
    assert torch.equal(unsqueeze_anchor(anchor), torch.where(mask, x, 0.0))
    assert torch.equal(unsqueeze_nonanchor(nonanchor), torch.where(mask, 0.0, x))
    assert torch.equal(unsqueeze_anchor(anchor) + unsqueeze_nonanchor(nonanchor), x)


# --- goldens (tiny set), each stage fed the golden input -----------------------------------------


@torch.no_grad()
def test_analysis(stages, golden):
    y, z = stages["analysis"](golden["y0"])
    assert_close_rel(y, golden["lfgcm_y"], 1e-5, "y")
    assert_close_rel(z, golden["lfgcm_z"], 1e-5, "z")


@torch.no_grad()
def test_hyper_synthesis(stages, golden):
    assert_close_rel(stages["hyper_synthesis"](golden["lfgcm_z_hat"]), golden["lfgcm_hyper_params"], 1e-5,
                     "hyper_params")


@torch.no_grad()
def test_synthesis(stages, golden):
    assert_close_rel(stages["synthesis"](golden["lfgcm_y_hat"]), golden["c_latent"], 1e-5, "c_latent")


@torch.no_grad()
def test_entropy_parameters_every_slice(stages, golden, symbols, tiny_config):
    ep = stages["entropy_parameters"]
    hyper, y_hat = golden["lfgcm_hyper_params"], golden["lfgcm_y_hat"]
    scales_hat, means_hat = golden["lfgcm_scales_hat"], golden["lfgcm_means_hat"]
    ranges = tiny_config.lfgcm.slice_ranges
    assert len(ranges) == 3
    for k, (a, b) in enumerate(ranges):
        scales, means, channel_ctx = ep.anchor(k, hyper, y_hat[:, :a] if k else None)
        assert (channel_ctx is None) == (k == 0)
        assert_close_rel(scales, squeeze_anchor(scales_hat[:, a:b]), 1e-5, f"slice {k} anchor scales")
        assert_close_rel(means, squeeze_anchor(means_hat[:, a:b]), 1e-5, f"slice {k} anchor means")
        assert_close_rel(scales[0], torch.from_numpy(symbols[f"slice{k}_anchor_scales"]), 1e-5)
        assert_close_rel(means[0], torch.from_numpy(symbols[f"slice{k}_anchor_means"]), 1e-5)

        anchor_hat = unsqueeze_anchor(squeeze_anchor(y_hat[:, a:b]))
        scales, means = ep.nonanchor(k, anchor_hat, hyper, channel_ctx)
        assert_close_rel(scales, squeeze_nonanchor(scales_hat[:, a:b]), 1e-5, f"slice {k} non-anchor scales")
        assert_close_rel(means, squeeze_nonanchor(means_hat[:, a:b]), 1e-5, f"slice {k} non-anchor means")
        assert_close_rel(scales[0], torch.from_numpy(symbols[f"slice{k}_nonanchor_scales"]), 1e-5)
        assert_close_rel(means[0], torch.from_numpy(symbols[f"slice{k}_nonanchor_means"]), 1e-5)


# --- checkpoint keys ----------------------------------------------------------------------------


def ckpt_shapes(cfg: LFGCMConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every parameter our stage modules hold (built on meta)."""
    out = {}
    with torch.device("meta"):
        for stage, cls in STAGES.items():
            for name, t in cls(cfg).state_dict().items():
                out[to_checkpoint_key(stage, name)] = tuple(t.shape)
    return out


def test_tiny_checkpoint_keys_all_accounted_for(tiny_config, tiny_state_dict):
    cfg = tiny_config.lfgcm
    ours = ckpt_shapes(cfg)
    unused = {PP + k: s for k, s in unused_key_shapes(cfg).items()}
    assert not ours.keys() & unused.keys()
    ckpt = {k: tuple(v.shape) for k, v in tiny_state_dict.items() if k.startswith(PP) and not k.startswith(NOT_OURS)}
    assert ckpt == {**ours, **unused}


def test_full_size_keys_match_manifest():
    manifest = json.loads((REFERENCE / "manifest_full.json").read_text())["keys"]
    want = {k: tuple(v["shape"]) for k, v in manifest.items() if k.startswith(PP) and not k.startswith(NOT_OURS)}
    cfg = ModelConfig.full().lfgcm
    ours = ckpt_shapes(cfg)
    unused = {PP + k: s for k, s in unused_key_shapes(cfg).items()}
    assert ours == {k: s for k, s in want.items() if manifest[k]["stage"] != "unused_at_inference"}
    assert unused == {k: s for k, s in want.items() if manifest[k]["stage"] == "unused_at_inference"}
    # channel_context[0] does not exist; the checkpoint numbers the others 1..9
    assert not any(k.startswith(PP + "channel_context.0.") for k in ours)


# --- full size, random weights -------------------------------------------------------------------


@torch.no_grad()
def test_full_size_smoke():
    cfg = ModelConfig.full().lfgcm
    torch.manual_seed(0)
    analysis, hyper_syn, ep, syn = (cls(cfg).eval() for cls in STAGES.values())
    y0 = torch.randn(1, 4, 8, 8)  # latent of a 64x64 image
    y, z = analysis(y0)
    assert y.shape == (1, 320, 4, 4) and z.shape == (1, 192, 1, 1)
    hyper = hyper_syn(z.round())
    assert hyper.shape == (1, 640, 4, 4)
    slices = []
    for k, (a, b) in enumerate(cfg.slice_ranges):
        scales, means, ctx = ep.anchor(k, hyper, torch.cat(slices, dim=1) if k else None)
        assert scales.shape == means.shape == (1, b - a, 4, 2)
        anchor_hat = unsqueeze_anchor(squeeze_anchor(y[:, a:b]).sub(means).round().add(means))
        scales_n, means_n = ep.nonanchor(k, anchor_hat, hyper, ctx)
        assert scales_n.shape == means_n.shape == (1, b - a, 4, 2)
        assert all(torch.isfinite(t).all() for t in (scales, means, scales_n, means_n))
        slices.append(anchor_hat + unsqueeze_nonanchor(squeeze_nonanchor(y[:, a:b]).sub(means_n).round().add(means_n)))
    y_c = syn(torch.cat(slices, dim=1))
    assert y_c.shape == (1, 4, 8, 8)
    assert torch.isfinite(y).all() and torch.isfinite(z).all() and torch.isfinite(y_c).all()


# --- ONNX ------------------------------------------------------------------------------------------


class _Slice1(torch.nn.Module):
    """One slice's decode-side computation: anchor params, anchors, non-anchor params."""

    def __init__(self, ep: EntropyParameters):
        super().__init__()
        self.ep = ep

    def forward(self, hyper, y_hat_prev, anchor_squeezed):
        scales, means, ctx = self.ep.anchor(1, hyper, y_hat_prev)
        scales_n, means_n = self.ep.nonanchor(1, unsqueeze_anchor(anchor_squeezed), hyper, ctx)
        return scales, means, scales_n, means_n


def test_entropy_parameters_export_to_onnx_with_dynamic_size(stages, golden, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    model = _Slice1(stages["entropy_parameters"]).eval()
    hyper, y_hat = golden["lfgcm_hyper_params"], golden["lfgcm_y_hat"]
    a, b = 2, 8  # slice 1 of the tiny config
    inputs = (hyper, y_hat[:, :a], squeeze_anchor(y_hat[:, a:b]))
    program = torch.onnx.export(model, inputs, dynamo=True, input_names=["hyper", "prev", "anchor"],
                                dynamic_shapes=tuple({2: Dim.AUTO, 3: Dim.AUTO} for _ in inputs))
    program.save(str(tmp_path / "slice1.onnx"))
    session = ort.InferenceSession(str(tmp_path / "slice1.onnx"), providers=["CPUExecutionProvider"])

    def run(xs):
        feed = {name: x.numpy() for name, x in zip(("hyper", "prev", "anchor"), xs)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    scales, means, scales_n, means_n = run(inputs)
    assert_close_rel(scales, squeeze_anchor(golden["lfgcm_scales_hat"][:, a:b]), 1e-5, "onnx anchor scales")
    assert_close_rel(means_n, squeeze_nonanchor(golden["lfgcm_means_hat"][:, a:b]), 1e-5, "onnx non-anchor means")

    other = (torch.randn(1, hyper.shape[1], 12, 20), torch.randn(1, a, 12, 20), torch.randn(1, b - a, 12, 10))
    with torch.no_grad():
        want = model(*other)
    for got, ref in zip(run(other), want):
        assert got.shape == ref.shape == (1, b - a, 12, 10)
        assert_close_rel(got, ref, 1e-5)
