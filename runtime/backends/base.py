"""The one interface every backend implements (after Polygraphy: a loader builds the artifact,
a runner executes it).

A backend runs the model's graphs by name (export/model.py lists them and their inputs and
outputs) on torch tensors that live on its device, and carries what the codec needs besides
the networks: the config, the entropy models and the model's identity.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from osdiff.config import ModelConfig
from osdiff.runtime import f32_native
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional, tables_digest


@dataclass
class EntropyModels:
    """Everything about a model that is not a network graph, and the model's identity: its
    stored weights (`weights_id`, export/model.py weights_digest) and its canonical entropy
    tables (`tables_id`). Both are bit-exact on every machine; streams carry a prefix of each."""

    config: ModelConfig
    entropy_bottleneck: EntropyBottleneck
    gaussian: GaussianConditional
    weights_id: bytes

    @functools.cached_property
    def tables_id(self) -> bytes:
        return tables_digest(self.gaussian, self.entropy_bottleneck)

    @property
    def fingerprint(self) -> bytes:
        """Weights and tables in one digest: what export and engine manifests tie a model to."""
        return hashlib.sha256(self.weights_id + self.tables_id).digest()

    @functools.cached_property
    def original(self) -> EntropyModels:
        """The same model with the tables the original implementation derives on this CPU
        (torch's float32 kernels, runtime/f32_native.py), for its raw stream format only: the
        original wrote such streams with such tables. Not portable (docs/entropy-tables.md)."""
        eb = self.entropy_bottleneck
        return EntropyModels(self.config, EntropyBottleneck(eb.params, eb.precision, f32_native),
                             GaussianConditional(self.config.entropy, f32_native), self.weights_id)


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
