"""The PyTorch backend: the reference modules themselves, on CPU or CUDA.

On CUDA the heavy stages (VAE, G_s, denoiser) can run in fp16 and in channels_last layout;
the entropy-parameter graphs always stay fp32, because a CDF index that differs from the
encoder's loses the stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from osdiff.export.model import OSDiffModel
from osdiff.runtime.backends.base import EntropyModels

HEAVY = ("vae_encoder", "synthesis", "denoiser", "vae_decoder")


class TorchBackend:
    name = "torch"

    def __init__(self, model: OSDiffModel, device: str | torch.device = "cpu", half: bool = False,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise ValueError("fp16 is only offered on CUDA (CPU fp16 convolutions are slow and inexact)")
        self.models = EntropyModels(model.config, model.entropy_bottleneck, model.gaussian, model.fingerprint)
        self.half = half
        self.graphs = model.graphs()
        self._dtype: dict[str, torch.dtype] = {}
        for name, module in model.stages.items():
            module.to(self.device)
        for name, g in self.graphs.items():
            heavy = name in HEAVY
            dtype = torch.float16 if (half and heavy) else torch.float32
            self._dtype[name] = dtype
            if heavy:
                g.module.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def module(self, graph: str) -> nn.Module:
        return self.graphs[graph].module

    @torch.inference_mode()
    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        g = self.graphs[graph]
        dtype = self._dtype[graph]
        out = g.module(*(x.to(self.device, dtype) for x in inputs))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float() for o in out)
