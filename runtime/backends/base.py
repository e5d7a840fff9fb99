"""The one interface every backend implements (after Polygraphy: a loader builds the artifact,
a runner executes it).

A backend runs the model's graphs by name (export/model.py lists them and their inputs and
outputs) on torch tensors that live on its device, and carries what the codec needs besides
the networks: the config, the entropy models and the model fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from osdiff.config import ModelConfig
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional


@dataclass
class EntropyModels:
    """Everything about a model that is not a network graph."""

    config: ModelConfig
    entropy_bottleneck: EntropyBottleneck
    gaussian: GaussianConditional
    fingerprint: bytes


class GraphRunner(Protocol):
    """What the latent codec needs: graphs run by name on one device."""

    device: torch.device

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]: ...


class Backend(GraphRunner, Protocol):
    name: str
    models: EntropyModels

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        """Run one graph; inputs and outputs are float32 tensors on `device`, in the order
        export/model.py gives."""
        ...


# A backend may also offer `decode_tail(y_hat, x_T) -> image`: synthesis, denoiser and
# vae_decoder in one call (the TensorRT backend replays them as one CUDA graph); the codec
# uses it when present.
