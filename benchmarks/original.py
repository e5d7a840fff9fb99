"""The ORIGINAL OSDiff implementation as a baseline, imported at run time from a checkout the user
names (github.com/cheesejiang/OSDiff; `make gpu-kit` puts one in .gpu-kit/OSDiff). Nothing of it
is copied into this repository.

Its modules are imported unmodified, as the golden data was made (../shared/reference/README.md,
section 2): third-party imports that have nothing to do with inference (pytorch_lightning, lpips,
pyiqa, tensorboard, cv2, kornia, transformers, thop, openai clip) are replaced by inert stand-ins
(`install_stand_ins`), and so is torchvision where the installed one does not import (a build
for another torch: nothing at inference uses it). OpenCLIP is built without downloading weights.

    model = build(checkout, cfg, device, weights=OSDiffModel.random(cfg))   # our weights in its modules
    codec = OriginalCodec(checkout, model)
    data = codec.compress(image)            # what its inference.py writes to the stream file
    image = codec.decompress(data, (h, w))  # the rest of its process(): CLIP, one step, VAE

What runs is what `inference.py` runs, in its order and precision (fp32 eager), split at the two
halves of its `process()` so that encode and decode are timed apart, bytes in to pixels out.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osdiff.config import ModelConfig
from osdiff.export.checkpoint import EB, eb_canonical, to_checkpoint_key
from osdiff.runtime.profiling import NO_TRACE, Trace

# ---------------------------------------------------------------------------------------------
# Inert stand-ins for imports unrelated to inference
# ---------------------------------------------------------------------------------------------

STAND_INS = ("pytorch_lightning", "lpips", "pyiqa", "cv2", "kornia", "transformers", "thop", "clip",
             "torch.utils.tensorboard")


class _AnythingMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything


class Anything(metaclass=_AnythingMeta):
    """A class and its instances that accept any attribute, call or construction and do nothing:
    `SummaryWriter(log_dir=...)`, `pyiqa.create_metric(...)`, `class X(transformers.Foo)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "Anything":
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self


class LightningModule(torch.nn.Module):
    """What the original's modules use of pytorch_lightning.LightningModule at inference."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device

    def freeze(self) -> None:
        self.eval()
        self.requires_grad_(False)

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass


_EXPLICIT: dict[str, dict[str, Any]] = {
    "pytorch_lightning": {"LightningModule": LightningModule, "seed_everything": lambda seed=None, **_: torch.manual_seed(seed or 0)},
    "pytorch_lightning.utilities.distributed": {"rank_zero_only": lambda fn: fn},
    "pytorch_lightning.utilities.rank_zero": {"rank_zero_only": lambda fn: fn},
}


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, "inert stand-in (benchmarks/original.py)")
        module.__path__ = []
        module.__dict__.update(_EXPLICIT.get(spec.name, {}))
        module.__getattr__ = lambda name: Anything if not name.startswith("__") else _raise(name)  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _raise(name: str) -> Any:
    raise AttributeError(name)


def install_stand_ins() -> list[str]:
    """Put the stand-ins ahead of anything installed; returns their names. Idempotent."""
    names = list(STAND_INS)
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        names.append("torchvision")
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder(tuple(names)))
    return names


def import_original(checkout: str | Path) -> dict[str, types.ModuleType]:
    """The original's modules that inference uses, imported from `checkout`."""
    checkout = Path(checkout).resolve()
    if not (checkout / "model" / "osdiff.py").is_file() or not (checkout / "inference.py").is_file():
        raise FileNotFoundError(f"{checkout} is not a checkout of cheesejiang/OSDiff (no model/osdiff.py, inference.py)")
    install_stand_ins()
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    names = ("inference", "model.osdiff", "model.spaced_sampler", "utils.common", "utils.image", "open_clip")
    return {n: importlib.import_module(n) for n in names}


# ---------------------------------------------------------------------------------------------
# Building the original model with given sizes and weights
# ---------------------------------------------------------------------------------------------


def original_config(checkout: Path, cfg: ModelConfig) -> Any:
    """Its configs/model/osdiff.yaml with the sizes of `cfg` (for the full config: the values it
    already has), no SD checkpoint to initialize from, and OpenCLIP without pretrained weights."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(checkout / "configs" / "model" / "osdiff.yaml")
    p = conf.params
    p.sync_path = None  # weights are loaded afterwards, as inference.py does
    p.ckpt_path_pre = None
    p.linear_start, p.linear_end = cfg.diffusion.linear_start, cfg.diffusion.linear_end
    p.timesteps, p.scale_factor = cfg.diffusion.timesteps, cfg.diffusion.scale_factor
    u = cfg.unet
    for section in (p.unet_config.params, p.control_stage_config.params):
        section.update(model_channels=u.model_channels, channel_mult=list(u.channel_mult), num_res_blocks=u.num_res_blocks,
                       attention_resolutions=list(u.attention_resolutions), context_dim=u.context_dim,
                       transformer_depth=u.transformer_depth, in_channels=u.in_channels, out_channels=u.out_channels)
    p.unet_config.params.num_head_channels = u.num_head_channels
    c = cfg.control
    p.control_stage_config.params.update(num_head_channels=c.num_head_channels, hint_channels=c.hint_channels,
                                         control_model_ratio=c.ratio, control_scale=c.scale)
    v = cfg.vae
    p.first_stage_config.params.embed_dim = v.embed_dim
    p.first_stage_config.params.ddconfig.update(ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                                                z_channels=v.z_channels, in_channels=v.in_channels, out_ch=v.out_ch)
    lf = cfg.lfgcm
    p.preprocess_config.params.update(in_nc=lf.in_nc, out_nc=lf.out_nc, enc_mid=list(lf.enc_mid), N=lf.N, M=lf.M,
                                      prior_nc=lf.prior_nc, sft_ks=lf.sft_ks, slice_num=len(lf.slice_ch),
                                      slice_ch=list(lf.slice_ch))
    p.cond_stage_config.params.version = None  # OpenCLIP's random init: no download
    if cfg.text != ModelConfig.full().text:
        p.cond_stage_config.params.arch = _register_text_tower(cfg)
    return conf


def _register_text_tower(cfg: ModelConfig) -> str:
    """An OpenCLIP model config with our text tower's sizes (and a minimal vision tower, which the
    original deletes right after building), registered through open_clip's public API."""
    import open_clip

    name = f"osdiff-{cfg.name}-text"
    t = cfg.text
    if t.mlp_ratio != 4.0:
        raise ValueError("open_clip 2.22's text tower has a fixed MLP ratio of 4")
    spec = {"embed_dim": t.projection_dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                         "heads": t.heads, "layers": t.layers}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{name}.json").write_text(json.dumps(spec))
        open_clip.add_model_config(tmp)
    return name


def checkpoint_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    """Our OSDiffModel's weights under the checkpoint keys (the original's state_dict keys)."""
    sd: dict[str, torch.Tensor] = {}
    for stage, module in weights.stages.items():
        for key, value in module.state_dict().items():
            sd[to_checkpoint_key(stage, key)] = value
    sd.update({EB + key: value for key, value in weights.entropy_bottleneck.params.items()})
    return sd


def _fit_to(original: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as the original module can take it. EntropyBottleneck parameters get the
    installed compressai's spelling: a non-strict load would silently skip the other one (README
    7.2). The training-only discriminator is dropped: the original hard-codes its full size, so a
    small set's does not fit, and inference never runs it."""
    own = original.state_dict()
    new_names = any(k.startswith(EB + "matrices.") for k in own)
    out = {}
    for key, value in sd.items():
        if key.startswith("guidance_model."):
            continue
        ckey = eb_canonical(key)
        if ckey.startswith(EB) and not new_names and ckey != EB + "quantiles" and ckey[len(EB):].split(".")[0] in _OLD:
            kind, i = ckey[len(EB):].split(".")
            ckey = EB + _OLD[kind] + i
        out[ckey if ckey.startswith(EB) else key] = value
    return out


_OLD = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}


def build(checkout: str | Path, cfg: ModelConfig, device: str | torch.device = "cpu", weights: Any = None,
          state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The original OSDiff module, set up as its inference.py does: built from the config, the
    state dict loaded non-strictly with its own helper, the entropy tables updated, frozen, moved.

    weights: an OSDiffModel whose weights to load (the text tower, which ours does not keep, stays
    OpenCLIP's random init); or state_dict: a combined SD + OSDiff checkpoint dict. Raises
    ValueError if a key of ours does not exist in the original (a wrong key mapping)."""
    mods = import_original(checkout)
    from omegaconf import OmegaConf  # noqa: F401  (imported by the original too)

    conf = original_config(Path(checkout), cfg)
    model = mods["utils.common"].instantiate_from_config(conf)
    sd = _fit_to(model, state_dict if state_dict is not None else checkpoint_state_dict(weights))
    unknown = sorted(set(sd) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no place in the original model, e.g. {unknown[:5]}")
    mods["utils.common"].load_state_dict(model, sd, strict=False)
    model.preprocess_model.update(force=True)
    model.freeze()
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# Running it: inference.py's process(), split into encode and decode
# ---------------------------------------------------------------------------------------------


class OriginalCodec:
    """Bytes in, pixels out, through the original's own calls in process()'s order. Stages (spans
    of `trace`) are the original's calls, timed from outside: they are not altered.

    compress_batch / decompress_batch and `backend.device` make it usable wherever our Codec is
    profiled (runtime/profiler.py); its stream format stores no image size, so the size of the
    last compressed image is used for decompress_batch."""

    def __init__(self, checkout: str | Path, model: torch.nn.Module, workdir: str | Path | None = None) -> None:
        self.mods = import_original(checkout)
        self.model = model
        self.device = model.device
        self.backend = types.SimpleNamespace(name="original", device=self.device)
        self.size = (0, 0)
        self._tmp = tempfile.TemporaryDirectory(dir=workdir)
        self.stream_path = str(Path(self._tmp.name) / "stream")  # the original reads and writes files

    def compress_batch(self, images: list[np.ndarray], seeds: Any = None, trace: Trace = NO_TRACE) -> list[bytes]:
        self.size = images[0].shape[:2]
        return [self.compress(image, trace) for image in images]

    def decompress_batch(self, datas: list[bytes], trace: Trace = NO_TRACE) -> list[np.ndarray]:
        return [self.decompress(data, self.size, trace) for data in datas]

    @torch.no_grad()
    def compress(self, image: np.ndarray, trace: Trace = NO_TRACE) -> bytes:
        """H x W x 3 uint8 -> the stream file's bytes (its write_body format)."""
        with trace("upload"):
            x = self.mods["utils.image"].pad(image, scale=64)  # inference.main pads before process()
            control = torch.tensor(np.stack([x]) / 255.0, dtype=torch.float32, device=self.device).clamp_(0, 1)
            control = control.permute(0, 3, 1, 2).contiguous()
        with trace("vae_encoder + lfgcm compress"):
            self.model.apply_condition_compress(control, self.stream_path, control.shape[2], control.shape[3])
        with trace("write"):
            return Path(self.stream_path).read_bytes()

    @torch.no_grad()
    def decompress(self, data: bytes, size: tuple[int, int], trace: Trace = NO_TRACE) -> np.ndarray:
        """The stream file's bytes -> H x W x 3 uint8 (cropped to `size`, as inference.main does)."""
        model, spaced = self.model, self.mods["model.spaced_sampler"]
        with trace("parse"):
            Path(self.stream_path).write_bytes(data)
            sampler = spaced.SpacedSampler(model, var_type="fixed_small")
        with trace("lfgcm decompress (entropy + G_s)"):
            c_latent = model.apply_condition_decompress(self.stream_path)
        with trace("text encoder (per image)"):
            c_txt = model.get_learned_conditioning([""])
        cond = {"c_latent": [c_latent], "c_crossattn": [c_txt]}
        shape = (1, 4, c_latent.shape[2], c_latent.shape[3])
        with trace("noise"):
            x_T = torch.randn(shape, device=self.device, dtype=torch.float32)
        with trace("denoiser"):
            samples = sampler.sample(1, shape, cond, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                                     cond_fn=None, x_T=x_T)
        with trace("vae_decoder"):
            x = model.decode_first_stage(samples)
        with trace("download"):
            x = ((x + 1) / 2).clamp(0, 1)
            out = (x.permute(0, 2, 3, 1) * 255).cpu().numpy().clip(0, 255).astype(np.uint8)[0]
            return out[: size[0], : size[1]]

    @torch.no_grad()
    def process(self, image: np.ndarray) -> np.ndarray:
        """Its whole process() in one call (encode and decode), for a cross-check of the split."""
        x = self.mods["utils.image"].pad(image, scale=64)
        preds, *_ = self.mods["inference"].process(self.model, [x], "ddpm", 1, self.stream_path)
        return preds[0][: image.shape[0], : image.shape[1]]


def check_golden(checkout: str | Path, golden_dir: str | Path) -> list[str]:
    """Problems found when the original, imported this way, is run on a golden set it made
    (../shared/reference/tiny): it must write the golden stream byte for byte and decode it to
    the golden control hint. An empty list: the baseline machinery runs the original faithfully."""
    from safetensors.torch import load_file

    from osdiff.files import read_image

    golden_dir = Path(golden_dir)
    cfg = ModelConfig.from_json(golden_dir / "config.json")
    sd = torch.load(golden_dir / "sd21_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd.update(torch.load(golden_dir / "osdiff_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"])
    codec = OriginalCodec(checkout, build(checkout, cfg, "cpu", state_dict=sd))
    image = read_image(golden_dir / "input.png")
    problems = []
    data = codec.compress(image)
    if data != (golden_dir / "stream.bin").read_bytes():
        problems.append("its stream differs from the golden stream.bin")
    Path(codec.stream_path).write_bytes((golden_dir / "stream.bin").read_bytes())
    with torch.no_grad():
        c_latent = codec.model.apply_condition_decompress(codec.stream_path)
    ref = load_file(str(golden_dir / "golden.safetensors"))["c_latent"]
    err = float((c_latent - ref).abs().max() / ref.abs().max())
    if not err < 1e-5:
        problems.append(f"its decoded control hint is {err:.2e} (relative) off the golden c_latent")
    out = codec.decompress(data, image.shape[:2])
    if out.shape != image.shape or out.dtype != np.uint8:
        problems.append(f"it decoded a {out.dtype} {out.shape} image")
    return problems


if __name__ == "__main__":
    # python benchmarks/original.py CHECKOUT GOLDEN_DIR: check the baseline machinery on a golden set
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/original.py CHECKOUT ../shared/reference/tiny")
    found = check_golden(sys.argv[1], sys.argv[2])
    print("\n".join(found) if found else f"the original at {sys.argv[1]} reproduces the golden set {sys.argv[2]}")
    raise SystemExit(1 if found else 0)
