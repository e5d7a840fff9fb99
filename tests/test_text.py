"""OpenCLIP text encoder: the empty-prompt context golden and checkpoint key accounting."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REFERENCE, assert_close_rel, sub_state_dict
from osdiff.config import ModelConfig
from osdiff.export.models.text import TextEncoder, empty_prompt_tokens, unused_key_shapes

PREFIX = "cond_stage_model.model."


def test_empty_prompt_tokens(tiny_dir):
    ids = json.loads((tiny_dir / "config.json").read_text())["text_encoder"]["token_ids"]
    tokens = empty_prompt_tokens()
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [ids]
    assert tokens.shape == (1, 77)


@pytest.fixture(scope="module")
def tiny_text(tiny_config, tiny_state_dict) -> TextEncoder:
    sd = sub_state_dict(tiny_state_dict, PREFIX)
    unused = unused_key_shapes(tiny_config.text)
    for key, shape in unused.items():
        assert tuple(sd[key].shape) == shape, key
    model = TextEncoder(tiny_config.text).eval()
    model.load_state_dict({k: v for k, v in sd.items() if k not in unused}, strict=True)
    return model


@torch.no_grad()
def test_context_golden(tiny_text, golden):
    assert_close_rel(tiny_text(empty_prompt_tokens()), golden["context"], 1e-5, "context")


@torch.no_grad()
def test_mask_is_causal(tiny_text):
    # changing a later token must not change earlier outputs, and must change its own
    tokens = torch.randint(0, 49408, (2, 77))
    out = tiny_text(tokens)
    tokens2 = tokens.clone()
    tokens2[:, 40] = (tokens2[:, 40] + 1) % 49408
    out2 = tiny_text(tokens2)
    assert torch.allclose(out[:, :40], out2[:, :40], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 40], out2[:, 40])
    assert "attn_mask" not in tiny_text.state_dict()


def test_full_size_keys_match_manifest():
    manifest = json.loads((REFERENCE / "manifest_full.json").read_text())["keys"]
    want = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in manifest.items() if k.startswith(PREFIX)}
    cfg = ModelConfig.full().text
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in TextEncoder(cfg).state_dict().items()}
    unused = unused_key_shapes(cfg)
    assert not ours.keys() & unused.keys()
    assert {**ours, **unused} == want
    used_in_manifest = {k for k in want if manifest[PREFIX + k]["stage"] == "text_encoder"}
    assert ours.keys() == used_in_manifest
