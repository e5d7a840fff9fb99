"""The checkpoint loader: safe, complete key accounting, clear errors on wrong files."""

from __future__ import annotations

import _compat_pickle
import contextlib
import copyreg
import importlib
import json
import os
import pickle
import sys
import types
import typing
import warnings
import zipfile

import numpy as np

import pytest
import torch

from conftest import REFERENCE, assert_close_rel
from osdiff.config import ModelConfig
from osdiff.export import safe_unpickle
from osdiff.export.checkpoint import (
    DERIVED,
    CheckpointError,
    CheckpointWarning,
    describe,
    eb_canonical,
    expected_keys,
    read_checkpoints,
    read_state_dict,
    split_by_stage,
)
from osdiff.export.model import OSDiffModel
from osdiff.export.safe_unpickle import CODE_RUNNING


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


class _Shell:
    """Pickles to os.system("touch MARKER")."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Boom, _Shell])
def test_an_armed_pickle_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    payload.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": payload()}, path)
    with pytest.raises(CheckpointError, match="this file tries to run code"):
        read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload really is armed: an unsafe loader runs it
    assert marker.exists()


def _archive(path, pickle_bytes: bytes) -> None:
    """A torch.save-layout zip around a hand-written pickle."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")


def _calls(module: str, name: str) -> bytes:
    """Protocol-2 pickle of {"state_dict": {}, "x": module.name("arg")}."""
    return (b"\x80\x02}q\x00(X\x0a\x00\x00\x00state_dict}X\x01\x00\x00\x00xc" + f"{module}\n{name}\n".encode()
            + b"X\x03\x00\x00\x00arg\x85Ru.")


# every listed name of every family, and a representative of the families listed whole
_CALLABLES = sorted(
    {(m, n) for m, names in CODE_RUNNING.items() for n in names}
    | {(m, n) for m, n in [("os", "system"), ("os", "execv"), ("os", "execvp"), ("os", "spawnl"), ("os", "popen"),
                           ("os", "posix_spawn"), ("os", "remove"), ("posix", "system"), ("posix", "execv"),
                           ("nt", "system"), ("subprocess", "Popen"), ("subprocess", "call"), ("subprocess", "run"),
                           ("subprocess", "check_output"), ("runpy", "run_path"), ("runpy", "run_module"),
                           ("importlib", "import_module"), ("importlib.util", "spec_from_file_location"),
                           ("_pickle", "loads"), ("marshal", "loads"), ("ctypes", "CDLL"), ("shutil", "rmtree"),
                           ("sys", "exit"), ("pty", "spawn"), ("code", "interact")]}
)


@pytest.mark.parametrize("module,name", _CALLABLES, ids=[f"{m}.{n}" for m, n in _CALLABLES])
def test_every_code_running_callable_is_refused_before_anything_runs(tmp_path, module, name):
    """Each one is replaced by a tripwire where it exists (for the duration of the read only),
    so that even a resolved name could not run unnoticed; the file must be refused by name and
    the tripwire never touched. Builtins cannot be swapped out under the reader itself: for
    eval, exec and open the marker-file payloads below prove it."""
    path = tmp_path / "evil.ckpt"
    _archive(path, _calls(module, name))
    calls: list = []
    try:
        mod = None if module in ("builtins", "__builtin__") else importlib.import_module(module)
    except ImportError:
        mod = None  # nt on Linux, dill, ...: refused by name all the same
    original = getattr(mod, name, None)
    if original is not None:
        setattr(mod, name, lambda *a, **k: calls.append(a))
    try:
        with pytest.raises(CheckpointError) as e:
            read_state_dict(path)
    finally:
        if original is not None:
            setattr(mod, name, original)
    # named as Python 3 spells it (a protocol-2 pickle writes builtins as __builtin__)
    py3 = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
    assert f"this file tries to run code: it calls {'.'.join(py3)}" in str(e.value)
    assert calls == []


def test_protocol_2_builtins_load_as_data_under_their_python_3_names(tmp_path):
    payload = {"state_dict": {"w": torch.ones(2)}, "s": {1, 2}, "f": frozenset({3}), "c": 1 + 2j, "sl": slice(1, 5),
               "b": bytearray(b"ab")}
    torch.save(payload, tmp_path / "p2.ckpt", pickle_protocol=2)
    assert b"__builtin__" in zipfile.ZipFile(tmp_path / "p2.ckpt").read("p2/data.pkl")
    obj = safe_unpickle.load(tmp_path / "p2.ckpt")
    assert {k: obj[k] for k in "sfc"} == {"s": {1, 2}, "f": frozenset({3}), "c": 1 + 2j}
    assert obj["sl"] == slice(1, 5) and obj["b"] == bytearray(b"ab")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ignored
        assert torch.equal(read_state_dict(tmp_path / "p2.ckpt")["w"], torch.ones(2))


@pytest.mark.parametrize("module,name,arg", [
    ("builtins", "exec", "open({marker!r}, 'w').write('x')"),
    ("builtins", "eval", "open({marker!r}, 'w').write('x')"),
    ("builtins", "open", "{marker}"),
])
def test_builtin_payloads_leave_no_trace(tmp_path, module, name, arg):
    marker = tmp_path / "pwned"
    text = arg.format(marker=str(marker)).encode()
    pickle_bytes = (b"\x80\x02}q\x00(X\x0a\x00\x00\x00state_dict}X\x01\x00\x00\x00xc" + f"{module}\n{name}\n".encode()
                    + b"X" + len(text).to_bytes(4, "little") + text + b"X\x01\x00\x00\x00w\x86Ru.")
    if name != "open":  # open takes (file, mode); exec and eval (source, globals): give them one argument
        pickle_bytes = pickle_bytes.replace(b"X\x01\x00\x00\x00w\x86R", b"\x85R")
    path = tmp_path / "evil.ckpt"
    _archive(path, pickle_bytes)
    with pytest.raises(CheckpointError, match="this file tries to run code"):
        read_state_dict(path)
    assert not marker.exists()
    pickle.loads(pickle_bytes)  # armed: plain pickle creates the marker
    assert marker.exists()


# --- objects of classes the reader does not know: inert placeholders ---------------------------

_RAN: list[str] = []


def _would_run(*args):
    _RAN.append("called")


class _ReducesToACall:
    def __reduce__(self):
        return (_would_run, ("reduce",))


class _BuildsState:
    def __getstate__(self):
        return {"a": 1}

    def __setstate__(self, state):
        _RAN.append("setstate")


class _DictSubclass(dict):
    def __setitem__(self, key, value):
        _RAN.append("setitem")


class _ListSubclass(list):
    def append(self, value):
        _RAN.append("append")

    def extend(self, values):
        _RAN.append("extend")


class _NewObj:
    def __new__(cls, *args):
        _RAN.append("new")
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (type(self), 1, 2))


def test_unknown_classes_load_as_inert_placeholders(tmp_path):
    """REDUCE, NEWOBJ, BUILD, SETITEMS and APPENDS on classes that are importable (this test
    module) but unknown to the reader: nothing of theirs is imported or called."""
    d, l = _DictSubclass(), _ListSubclass()
    dict.__setitem__(d, "k", 1)
    list.extend(l, [1, 2])
    payload = {"state_dict": {"w": torch.ones(2)}, "a": _ReducesToACall(), "b": _BuildsState(), "c": d, "e": l,
               "f": object.__new__(_NewObj), "g": {_BuildsState: "a class as a key"}}
    torch.save(payload, tmp_path / "x.ckpt")
    _RAN.clear()
    obj = safe_unpickle.load(tmp_path / "x.ckpt")
    assert _RAN == []
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    for key in "abcef":
        assert safe_unpickle.is_opaque(obj[key]), key
    (cls,) = obj["g"]
    assert safe_unpickle.is_opaque(cls) and safe_unpickle.opaque_class_name(cls).endswith("test_checkpoint._BuildsState")
    with pytest.warns(CheckpointWarning, match="ignored: .*g: 1 entry of unknown class .*_BuildsState"):
        assert torch.equal(read_state_dict(tmp_path / "x.ckpt")["w"], torch.ones(2))


# --- what training stacks write besides the tensors --------------------------------------------


@contextlib.contextmanager
def _fake_modules(classes: dict[str, type]):
    """Make `module.Name` importable for pickle while saving (the real libraries need not be
    installed); removed afterwards, so loading cannot import them either."""
    added = []
    for full, cls in classes.items():
        module, _, name = full.rpartition(".")
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            mod_name = ".".join(parts[:i])
            if mod_name not in sys.modules:
                sys.modules[mod_name] = types.ModuleType(mod_name)
                added.append(mod_name)
        cls.__module__, cls.__qualname__ = module, name
        setattr(sys.modules[module], name, cls)
    try:
        yield
    finally:
        for mod_name in added:
            sys.modules.pop(mod_name, None)


class ModelCheckpoint:  # pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, as ldm-era Lightning keys it
    pass


class DictConfig:
    """Pickles like omegaconf's DictConfig: NEWOBJ, then a state dict holding metadata objects
    and a typing reference."""

    def __init__(self, content):
        self._content = content

    def __getstate__(self):
        return {"_content": self._content, "_metadata": ContainerMetadata(), "_parent": None,
                "_flags_cache": None}


class ContainerMetadata:
    def __init__(self):
        self.ref_type = typing.Any
        self.object_type = dict
        self.key_type = typing.Any
        self.flags = {}


def _training_stack_checkpoint(tiny_dir, path, kind: str) -> None:
    """The tiny OSDiff checkpoint, its tensors untouched, with what one training stack adds."""
    ckpt = torch.load(tiny_dir / "osdiff_tiny.ckpt", map_location="cpu", weights_only=True)
    if kind == "numpy":
        ckpt.update(global_step=np.int64(12345), epoch=np.int64(7), best=np.float32(0.25),
                    history=np.arange(4, dtype=np.int64))
        torch.save(ckpt, path)
    elif kind == "callbacks":
        with _fake_modules({"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": ModelCheckpoint}):
            ckpt["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "dirpath": "/ckpt"}}
            torch.save(ckpt, path)
    else:
        classes = {"omegaconf.dictconfig.DictConfig": DictConfig, "omegaconf.base.ContainerMetadata": ContainerMetadata}
        with _fake_modules(classes):
            ckpt["hyper_parameters"] = {"config": DictConfig({"model": {"lr": 1e-4}}), "lr": 1e-4}
            torch.save(ckpt, path)


@pytest.mark.parametrize("kind,ignored", [
    ("numpy", None),
    ("callbacks", "callbacks: 1 entry of unknown class pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    ("omegaconf", "hyper_parameters: 1 entry of unknown class omegaconf.dictconfig.DictConfig"),
])
def test_training_stack_checkpoints_load_and_verify_against_golden_data(tiny_dir, tiny_config, tiny_model, golden,
                                                                        tmp_path, kind, ignored):
    path = tmp_path / f"osdiff_{kind}.ckpt"
    _training_stack_checkpoint(tiny_dir, path, kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = OSDiffModel.load(tiny_dir / "sd21_tiny.ckpt", path, tiny_config)
    notes = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    if ignored is None:
        assert notes == []
    else:
        assert len(notes) == 1 and f"ignored: {ignored}" in notes[0], notes
    assert model.fingerprint == tiny_model.fingerprint
    with torch.no_grad():  # and one stage straight against the golden data
        decoded = model.stages["vae_decoder"](golden["y_r"])
    assert_close_rel(decoded, golden["decoded"], name="decoded")
    if kind == "numpy":
        raw = safe_unpickle.load(path)
        assert type(raw["global_step"]) is np.int64 and raw["global_step"] == 12345
        assert raw["best"] == np.float32(0.25) and raw["history"].tolist() == [0, 1, 2, 3]


def test_plain_pickles_and_legacy_files_are_named(tmp_path):
    path = tmp_path / "plain.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"w": 1}}))
    with pytest.raises(CheckpointError, match="legacy"):
        read_state_dict(path)


def test_a_view_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    # storage offset 0, size (4,) -> size (400,): BININT1 4 -> BININT2 400
    assert b"K\x00K\x04\x85" in members[name]
    members[name] = members[name].replace(b"K\x00K\x04\x85", b"K\x00M\x90\x01\x85")
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match="not a readable"):
        read_state_dict(path)


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
