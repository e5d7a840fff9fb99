"""The measurements behind the fp16 islands (precision.py FP16_ISLANDS): the activations each
island sees on real inputs, and what the same operation does when computed in fp16.

- GroupNorm (every one of the VAE, UNet and control module): the largest |x| entering it (fp16
  overflows past 65504) and the largest |group mean| / group std: fp16 keeps 11 significant bits,
  so x - mean loses about log2(|mean| / std) of them; and the error of F.group_norm computed in
  fp16 against fp32, relative to the output's largest value.
- attention logits, q.k / sqrt(d), of the VAE's single-head mid-block attention and of the
  UNet's and control module's self- and cross-attention: the largest |logit| (fp16 overflow at
  65504 gives inf and NaN after softmax) and the error of softmax(logits) computed in fp16.

Measured on the inputs the fp32 codec gives each heavy graph (calibration/pipeline.py run_fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.calibration.pipeline import CalibrationRun
from osdiff.calibration.precision import FP16_GRAPHS

FP16_MAX = 65504.0


def _merge(stats: dict[str, dict[str, float]], name: str, new: dict[str, float]) -> None:
    old = stats.setdefault(name, {})
    for k, v in new.items():
        old[k] = max(old.get(k, v), v)


def _group_norm_stats(m: nn.GroupNorm, x: Tensor) -> dict[str, float]:
    x = x.float()
    g = x.reshape(x.shape[0], m.num_groups, -1)
    mean, std = g.mean(-1), g.std(-1, unbiased=False)
    ref = F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
    half = F.group_norm(x.half(), m.num_groups, m.weight.half(), m.bias.half(), m.eps).float()
    return {"max_abs_input": float(x.abs().max()), "max_mean_over_std": float((mean.abs() / std.clamp_min(1e-12)).max()),
            "fp16_rel_error": float((half - ref).abs().max() / ref.abs().max().clamp_min(1e-12))}


def _attention_stats(q: Tensor, k: Tensor) -> dict[str, float]:
    """q, k: B x H x N x d."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = logits.softmax(-1)
    half = (q.half().float() @ k.half().float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    overflow = half.abs() > FP16_MAX
    p16 = half.clamp(-FP16_MAX, FP16_MAX).half().float().softmax(-1)
    return {"max_abs_logit": float(logits.abs().max()), "fp16_overflowing_logits": float(overflow.sum()),
            "fp16_softmax_max_error": float((p16.double() - ref).abs().max())}


def island_ranges(model: Any, run: CalibrationRun, max_calls: int = 4) -> dict[str, dict[str, dict[str, float]]]:
    """island -> module path (graph-prefixed) -> the largest value of each statistic over the
    first `max_calls` recorded inputs of every fp16 graph."""
    from osdiff.export.models.unet import CrossAttention
    from osdiff.export.models.vae import AttnBlock

    stats: dict[str, dict[str, dict[str, float]]] = {"group_norm": {}, "vae_attention": {}, "unet_attention": {}}
    graphs = model.graphs()
    for g in FP16_GRAPHS:
        hooks = []
        for name, m in graphs[g].module.named_modules():
            key = f"{g}:{name}"
            if isinstance(m, nn.GroupNorm):
                hooks.append(m.register_forward_hook(_hook(lambda mod, args, out, key=key:  # type: ignore[misc]
                                                          _merge(stats["group_norm"], key, _group_norm_stats(mod, args[0])))))
            elif isinstance(m, AttnBlock):
                def vae_attn(mod: AttnBlock, args: tuple, out: Tensor, key: str = key) -> None:
                    h = mod.norm(args[0])
                    q, k = (c(h).flatten(2).transpose(1, 2).unsqueeze(1) for c in (mod.q, mod.k))
                    _merge(stats["vae_attention"], key, _attention_stats(q, k))
                hooks.append(m.register_forward_hook(_hook(vae_attn)))
            elif isinstance(m, CrossAttention):
                def unet_attn(mod: CrossAttention, args: tuple, out: Tensor, key: str = key) -> None:
                    x = args[0]
                    ctx = args[1] if len(args) > 1 and args[1] is not None else x
                    q, k = (t.unflatten(-1, (mod.heads, -1)).transpose(1, 2) for t in (mod.to_q(x), mod.to_k(ctx)))
                    _merge(stats["unet_attention"], key, _attention_stats(q, k))
                hooks.append(m.register_forward_hook(_hook(unet_attn)))
        try:
            with torch.no_grad():
                for args in run.inputs[g][:max_calls]:
                    graphs[g].module(*args)
        finally:
            for h in hooks:
                h.remove()
    return stats


def _hook(f: Callable[..., None]) -> Callable[..., None]:
    def wrapped(mod: nn.Module, args: tuple, out: Any) -> None:
        with torch.no_grad():
            f(mod, args, out)
    return wrapped


def summary(stats: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The worst value of each statistic per island, over all its modules."""
    out: dict[str, dict[str, float]] = {}
    for island, modules in stats.items():
        for row in modules.values():
            for k, v in row.items():
                out.setdefault(island, {})[k] = max(out.get(island, {}).get(k, v), v)
        if island in out:
            out[island]["modules"] = len(modules)
    return out
