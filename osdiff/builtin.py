"""The built-in model: the `demo` configuration with weights trained by `osdiff train
--builtin` (training/builtin.py), shipped as osdiff/assets/demo_model.safetensors and read
through the normal loader."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from osdiff.config import ModelConfig

if TYPE_CHECKING:
    from osdiff.export.model import OSDiffModel

WEIGHTS = "demo_model.safetensors"


def load_builtin() -> "OSDiffModel":
    """The built-in demo model (float16 weights in the file, float32 once loaded)."""
    from osdiff.export.model import OSDiffModel

    with resources.as_file(resources.files("osdiff") / "assets" / WEIGHTS) as path:
        return OSDiffModel.load(None, path, ModelConfig.demo())
