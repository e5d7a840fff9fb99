"""The checkpoint loader: safe, complete key accounting, clear errors on wrong files."""

from __future__ import annotations

import json
import pickle
import sys
import types

import pytest
import torch

from conftest import REFERENCE
from osdiff.config import ModelConfig
from osdiff.export.checkpoint import (
    DERIVED,
    CheckpointError,
    describe,
    eb_canonical,
    expected_keys,
    read_checkpoints,
    read_state_dict,
    split_by_stage,
)
from osdiff.export.model import OSDiffModel


def test_expected_keys_of_the_full_model_equal_the_reference_manifest():
    manifest = json.loads((REFERENCE / "manifest_full.json").read_text())["keys"]
    spec = expected_keys(ModelConfig.full())
    assert set(spec) == set(manifest)
    for key, s in spec.items():
        if key in DERIVED:
            assert s.shape is None  # recomputed after loading: any stored shape is accepted
        else:
            assert list(s.shape) == manifest[key]["shape"], key
        if manifest[key]["stage"] == "unused_at_inference":
            assert s.stage == "unused", key
        if s.stage not in ("unused", "derived"):  # a key we compute with is used by the reference too
            assert manifest[key]["stage"] not in ("unused_at_inference", "schedule_buffers"), key


def test_every_tiny_checkpoint_key_is_accounted_for(tiny_state_dict, tiny_config):
    parts = split_by_stage(tiny_state_dict, tiny_config)
    assert set(parts) >= {"vae_encoder", "denoiser", "entropy_bottleneck", "text_encoder"}
    assert parts["entropy_bottleneck"]["matrices.0"].shape == (8, 3, 1)


class _Boom:
    """Pickles to a call of exec: loading it with plain pickle would create MARKER."""

    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    _Boom.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "extra": _Boom()}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    # the payload really is armed: plain pickle would run it
    with pytest.raises(CheckpointError, match="(refused|not a readable)"):
        read_state_dict(path)
    assert not marker.exists()
    if not legacy:
        torch.load(path, weights_only=False)  # what an unsafe loader does
        assert marker.exists()


def test_lightning_hyper_parameters_are_accepted(tmp_path):
    """Lightning stores hyper_parameters as its AttributeDict: plain data, allowed."""
    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["pytorch_lightning.utilities.parsing"] = module
    try:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": AttributeDict(lr=1e-4),
                    "epoch": 3, "callbacks": {"x": {"best": torch.tensor(1.0)}}}, tmp_path / "l.ckpt")
    finally:
        for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
            sys.modules.pop(name, None)
    assert torch.equal(read_state_dict(tmp_path / "l.ckpt")["w"], torch.ones(2))


@pytest.mark.parametrize("name", ["sd21_tiny.ckpt", "weights.safetensors"])
def test_truncated_files_say_so(tiny_dir, tmp_path, name):
    data = (tiny_dir / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(cut)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "text.ckpt")


def test_swapped_checkpoints_are_named(tiny_dir):
    with pytest.raises(CheckpointError, match="swapped"):
        read_checkpoints(tiny_dir / "osdiff_tiny.ckpt", tiny_dir / "sd21_tiny.ckpt")


def test_sd15_checkpoint_is_named(tmp_path, tiny_dir):
    sd15 = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(49408, 768)}
    torch.save({"state_dict": sd15}, tmp_path / "v1-5.ckpt")
    assert "1.x" in describe(sd15)
    with pytest.raises(CheckpointError, match="Stable Diffusion 1.x"):
        read_checkpoints(tmp_path / "v1-5.ckpt", tiny_dir / "osdiff_tiny.ckpt")


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tiny_state_dict, tiny_config):
    sd = dict(tiny_state_dict)
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    sd["first_stage_model.quant_conv.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        split_by_stage(sd, tiny_config)
    message = str(e.value)
    for text in ("1 missing", "model.diffusion_model.out.2.weight", "1 unexpected", "model.diffusion_model.extra.weight",
                 "1 wrong shape", "first_stage_model.quant_conv.bias: file (5,), model (8,)"):
        assert text in message


def test_a_tiny_checkpoint_into_the_full_config_is_refused(tiny_state_dict):
    with pytest.raises(CheckpointError, match="does not fit the model config 'osdiff-full'"):
        split_by_stage(tiny_state_dict, ModelConfig.full())


def test_both_entropy_bottleneck_spellings_load_the_same_model(tiny_state_dict, tiny_config, tiny_model):
    renamed = {eb_canonical(k): v for k, v in tiny_state_dict.items()}
    assert any(".matrices.0" in k for k in renamed)
    assert OSDiffModel.from_state_dict(renamed, tiny_config).fingerprint == tiny_model.fingerprint
    both = dict(tiny_state_dict)
    both["preprocess_model.entropy_bottleneck.matrices.0"] = both["preprocess_model.entropy_bottleneck._matrix0"]
    with pytest.raises(CheckpointError, match="both spellings"):
        split_by_stage(both, tiny_config)


def test_stale_cdf_buffers_are_ignored(tiny_state_dict, tiny_config, tiny_model):
    """CDF tables are recomputed: whatever a file stores in them cannot desync the codec."""
    sd = dict(tiny_state_dict)
    sd["preprocess_model.entropy_bottleneck._quantized_cdf"] = torch.randint(0, 9, (8, 5), dtype=torch.int32)
    sd["preprocess_model.gaussian_conditional._quantized_cdf"] = torch.zeros(3, 3, dtype=torch.int32)
    model = OSDiffModel.from_state_dict(sd, tiny_config)
    assert model.entropy_bottleneck.tables == tiny_model.entropy_bottleneck.tables


def test_fp16_safetensors_and_fp32_ckpt_give_the_same_model(tiny_dir, tiny_config, tiny_model):
    """weights.safetensors stores parameters in float16 whose float32 values equal the .ckpt's."""
    single = OSDiffModel.load(tiny_dir / "weights.safetensors", None, tiny_config)
    assert single.fingerprint == tiny_model.fingerprint
    assert describe(read_state_dict(tiny_dir / "weights.safetensors")).startswith("a combined")
