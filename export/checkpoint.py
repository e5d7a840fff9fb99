"""Reading OSDiff checkpoints without running their code, and accounting for every key.

Users have two files: the SD 2.1 ldm checkpoint (`v2-1_512-ema-pruned.ckpt` or
.safetensors) and the OSDiff Lightning checkpoint (`lambda_*.ckpt`); the reference combines
them by updating the SD dict with the OSDiff dict. A single combined file works too.

Every key of the combined dict must be one of: used by a stage (then its shape is checked),
known to be unused (the training-only discriminator, LFGCM parts the forward pass never calls,
CLIP parts after the penultimate block, schedule buffers), or an entropy-model CDF buffer that
is recomputed after loading. Anything else, anything missing and any wrong shape is reported
in one error that lists them all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from osdiff.config import ModelConfig
from osdiff.export import safe_unpickle


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, of the wrong kind, or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


class CheckpointWarning(UserWarning):
    """Parts of a checkpoint that were read as opaque data and ignored (shown by the CLI)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.pth (torch.save's zip format) or .safetensors file.

    A torch file is read as data without running any of its code (export/safe_unpickle.py):
    a file that names a code-running callable is refused with "this file tries to run code";
    objects of other classes (Lightning callbacks, OmegaConf configs in hyper_parameters, ...)
    load as opaque placeholders, are ignored, and are named in a CheckpointWarning.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        ignored = _ignored(obj)
        if ignored:
            warnings.warn(f"{path}: ignored: {ignored}", CheckpointWarning, stacklevel=2)
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (found {_kind(obj)})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {e}") from e


def _torch_load(path: Path) -> object:
    try:
        return safe_unpickle.load(path)
    except safe_unpickle.CodeRunningPickle as e:
        raise CheckpointError(f"{path}: refused: {e} (nothing of it was run)") from e
    except safe_unpickle.UnpickleError as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e}") from e


def _kind(obj: object) -> str:
    return f"an object of unknown class {safe_unpickle.opaque_class_name(obj)}" if safe_unpickle.is_opaque(obj) \
        else type(obj).__name__


def _ignored(checkpoint: dict) -> str:
    """What besides the state dict holds objects of unknown classes, in words:
    "callbacks: 1 entry of unknown class pytorch_lightning.callbacks.ModelCheckpoint"."""
    parts = []
    for key, value in checkpoint.items():
        if key == "state_dict":
            continue
        if isinstance(value, dict):
            found = [_unknown_classes((k, v)) for k, v in value.items()]
            n, classes = sum(1 for f in found if f), set().union(*found)
            if n:
                parts.append(f"{key}: {n} {'entry' if n == 1 else 'entries'} of unknown class "
                             f"{', '.join(sorted(classes))}")
        else:
            classes = _unknown_classes(value)
            if classes:
                parts.append(f"{key}: unknown class {', '.join(sorted(classes))}")
    return "; ".join(parts)


def _unknown_classes(obj: object, depth: int = 0) -> set[str]:
    """Names of the placeholder classes inside a loaded value (containers followed 8 deep)."""
    if safe_unpickle.is_opaque(obj):
        return {safe_unpickle.opaque_class_name(obj)}
    if depth >= 8:
        return set()
    if isinstance(obj, dict):
        items: list[object] = [x for kv in obj.items() for x in kv]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    else:
        return set()
    return set().union(*(_unknown_classes(x, depth + 1) for x in items)) if items else set()


def describe(sd: dict[str, torch.Tensor]) -> str:
    """What kind of checkpoint a state dict is, in words a user recognizes."""
    has = lambda p: any(k.startswith(p) for k in sd)  # noqa: E731
    if has("cond_stage_model.transformer.") or has("cond_stage_model.model.transformer.text_model"):
        return "a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder); OSDiff needs SD 2.1"
    sd_part = has("model.diffusion_model.") and has("first_stage_model.")
    osdiff_part = has("control_model.") or has("preprocess_model.")
    if sd_part and osdiff_part:
        return "a combined SD 2.1 + OSDiff checkpoint"
    if sd_part:
        return "a Stable Diffusion 2.x checkpoint"
    if osdiff_part:
        return "an OSDiff (control module + LFGCM) checkpoint"
    first = ", ".join(list(sd)[:3])
    return f"not an SD or OSDiff checkpoint (first keys: {first})"


def read_checkpoints(sd_path: str | Path | None, osdiff_path: str | Path | None) -> dict[str, torch.Tensor]:
    """SD first, the OSDiff dict on top, as the reference combines them; either may be a
    combined file on its own."""
    paths = [p for p in (sd_path, osdiff_path) if p is not None]
    if not paths:
        raise CheckpointError("no checkpoint given")
    dicts = [read_state_dict(p) for p in paths]
    if sd_path is not None and osdiff_path is not None:
        sd_kind, os_kind = describe(dicts[0]), describe(dicts[1])
        if "OSDiff (" in sd_kind and "Stable Diffusion 2" in os_kind:
            raise CheckpointError(
                f"the two checkpoints are swapped: {sd_path} is {sd_kind} and {osdiff_path} is {os_kind}"
            )
        for path, kind, want in ((sd_path, sd_kind, "Stable Diffusion 2"), (osdiff_path, os_kind, "OSDiff")):
            if want not in kind and "combined" not in kind:
                raise CheckpointError(f"{path} is {kind}; expected {'an SD 2.1' if want[0] == 'S' else 'an OSDiff'} checkpoint")
    merged: dict[str, torch.Tensor] = {}
    for d in dicts:
        merged.update(d)
    return merged


# ---------------------------------------------------------------------------------------------
# Key accounting
# ---------------------------------------------------------------------------------------------

# (checkpoint prefix, stage-module prefix) for every stage module.
STAGE_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "vae_encoder": [("first_stage_model.encoder.", "encoder."), ("first_stage_model.quant_conv.", "quant_conv.")],
    "vae_decoder": [("first_stage_model.decoder.", "decoder."), ("first_stage_model.post_quant_conv.", "post_quant_conv.")],
    "text_encoder": [("cond_stage_model.model.", "")],
    "denoiser": [("model.diffusion_model.", "unet."), ("control_model.", "control.")],
    "analysis": [("preprocess_model.encoder.", "encoder."), ("preprocess_model.hyper_enc.", "hyper_enc.")],
    "hyper_synthesis": [("preprocess_model.hyper_dec.", "hyper_dec.")],
    "entropy_parameters": [
        (f"preprocess_model.{name}.", f"{name}.")
        for name in ("local_context", "channel_context", "entropy_parameters_anchor", "entropy_parameters_nonanchor")
    ],
    "synthesis": [("preprocess_model.decoder.", "decoder.")],
}

EB = "preprocess_model.entropy_bottleneck."
# compressai <= 1.2.4 spelling -> >= 1.2.5 spelling of the EntropyBottleneck parameters
_EB_RENAMES = (("_matrix", "matrices."), ("_bias", "biases."), ("_factor", "factors."))

# Recomputed from the learned parameters after loading; their stored value (often empty, as
# in every checkpoint written during training) is never used.
DERIVED = {
    EB + "_offset", EB + "_quantized_cdf", EB + "_cdf_length",
    "preprocess_model.gaussian_conditional._offset",
    "preprocess_model.gaussian_conditional._quantized_cdf",
    "preprocess_model.gaussian_conditional._cdf_length",
    "preprocess_model.gaussian_conditional.scale_table",
}

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)

# Keys some SD exports carry that no stage reads (EMA copies of the UNet).
TOLERATED_PREFIXES = ("model_ema.",)


@dataclass(frozen=True)
class KeySpec:
    shape: tuple[int, ...] | None  # None: any shape (derived buffers)
    stage: str  # a stage name, "entropy_bottleneck", "unused" or "derived"


def eb_canonical(key: str) -> str:
    """`preprocess_model.entropy_bottleneck._matrix0` -> `...matrices.0` (compressai >= 1.2.5)."""
    if key.startswith(EB):
        name = key[len(EB):]
        for old, new in _EB_RENAMES:
            if name.startswith(old) and name[len(old):].isdigit():
                return EB + new + name[len(old):]
    return key


def expected_keys(cfg: ModelConfig) -> dict[str, KeySpec]:
    """Every key of a combined SD 2.1 + OSDiff state dict for this config, with compressai 1.2.4
    names for the EntropyBottleneck (what OSDiff's pinned compressai writes)."""
    from osdiff.export.model import build_stages
    from osdiff.export.models import lfgcm, text, unet

    spec: dict[str, KeySpec] = {}
    with torch.device("meta"):
        stages = build_stages(cfg)
    for stage, module in stages.items():
        for name, t in module.state_dict().items():
            spec[to_checkpoint_key(stage, name)] = KeySpec(tuple(t.shape), stage)

    n, f = cfg.lfgcm.N, (3, 3, 3, 3)
    dims = (1, *f, 1)
    for i in range(len(f) + 1):
        spec[f"{EB}_matrix{i}"] = KeySpec((n, dims[i + 1], dims[i]), "entropy_bottleneck")
        spec[f"{EB}_bias{i}"] = KeySpec((n, dims[i + 1], 1), "entropy_bottleneck")
        if i < len(f):
            spec[f"{EB}_factor{i}"] = KeySpec((n, dims[i + 1], 1), "entropy_bottleneck")
    spec[EB + "quantiles"] = KeySpec((n, 1, 3), "entropy_bottleneck")
    for key in DERIVED:
        spec[key] = KeySpec(None, "derived")

    unused: dict[str, tuple[int, ...]] = {}
    unused.update({b: (cfg.diffusion.timesteps,) for b in SCHEDULE_BUFFERS})
    unused.update({"cond_stage_model.model." + k: s for k, s in text.unused_key_shapes(cfg.text).items()})
    unused.update({"preprocess_model." + k: s for k, s in lfgcm.unused_key_shapes(cfg.lfgcm).items()})
    unused.update({EB + "target": (3,), EB + "likelihood_lower_bound.bound": (1,)})
    for k in ("scale_bound", "likelihood_lower_bound.bound", "lower_bound_scale.bound"):
        unused["preprocess_model.gaussian_conditional." + k] = (1,)
    g = cfg.guidance
    unused.update({"guidance_model.Discriminator." + k: s for k, s in unet.discriminator_key_shapes(g).items()})
    c_in, c = g.model_channels * g.channel_mult[-1], g.dmlp_channels
    dmlp = {"0.weight": (c, c_in, 4, 4), "0.bias": (c,), "1.weight": (c,), "1.bias": (c,),
            "3.weight": (c, c, 4, 4), "3.bias": (c,), "4.weight": (c,), "4.bias": (c,),
            "6.weight": (1, c, 1, 1), "6.bias": (1,)}
    unused.update({"guidance_model.DMLP." + k: s for k, s in dmlp.items()})
    for key, shape in unused.items():
        spec[key] = KeySpec(tuple(shape), "unused")
    return spec


def to_checkpoint_key(stage: str, name: str) -> str:
    for ckpt_prefix, module_prefix in STAGE_PREFIXES[stage]:
        if name.startswith(module_prefix):
            return ckpt_prefix + name[len(module_prefix):]
    raise KeyError(f"{stage}: no checkpoint prefix for module key {name}")


def split_by_stage(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Check every key of `sd` against the config and return each stage's state dict
    (module key names), plus "entropy_bottleneck" with compressai >= 1.2.5 names."""
    spec = expected_keys(cfg)
    # accept both EntropyBottleneck spellings, but never both at once
    canonical_spec = {eb_canonical(k): v for k, v in spec.items()}
    seen: dict[str, str] = {}
    problems: list[str] = []
    out: dict[str, dict[str, torch.Tensor]] = {stage: {} for stage in STAGE_PREFIXES}
    out["entropy_bottleneck"] = {}
    unexpected, misshaped = [], []
    for key, tensor in sd.items():
        ckey = eb_canonical(key)
        if ckey in seen:
            problems.append(f"both spellings of an EntropyBottleneck parameter: {seen[ckey]} and {key}")
            continue
        seen[ckey] = key
        s = canonical_spec.get(ckey)
        if s is None:
            if not key.startswith(TOLERATED_PREFIXES):
                unexpected.append(f"{key} {tuple(tensor.shape)}")
            continue
        if s.shape is not None and tuple(tensor.shape) != s.shape:
            misshaped.append(f"{key}: file {tuple(tensor.shape)}, model {s.shape}")
            continue
        if s.stage == "entropy_bottleneck":
            out["entropy_bottleneck"][ckey[len(EB):]] = tensor
        elif s.stage in STAGE_PREFIXES:
            out[s.stage][_to_module_key(s.stage, key)] = tensor
    missing = [f"{k} {v.shape}" for k, v in canonical_spec.items() if v.stage not in ("unused", "derived") and k not in seen]
    if missing or unexpected or misshaped or problems:
        raise CheckpointError(_report(cfg, missing, unexpected, misshaped, problems, sd))
    return out


def _to_module_key(stage: str, key: str) -> str:
    for ckpt_prefix, module_prefix in STAGE_PREFIXES[stage]:
        if key.startswith(ckpt_prefix):
            return module_prefix + key[len(ckpt_prefix):]
    raise KeyError(key)


def _report(cfg: ModelConfig, missing: list[str], unexpected: list[str], misshaped: list[str],
            problems: list[str], sd: dict[str, torch.Tensor]) -> str:
    lines = [f"the checkpoint does not fit the model config '{cfg.name}' ({describe(sd)}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped), ("other", problems)):
        if items:
            lines.append(f"  {len(items)} {title} key(s):")
            lines.extend(f"    {x}" for x in items[:20])
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")
    return "\n".join(lines)
