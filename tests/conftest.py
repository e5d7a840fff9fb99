"""Shared fixtures: the reference golden set that sits beside the checkout (../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("OSDIFF_REFERENCE", REPO.parent / "shared" / "reference"))
TINY = REFERENCE / "tiny"


def assert_close_rel(ours: torch.Tensor, golden: torch.Tensor, rel: float = 1e-5, name: str = "") -> None:
    """The golden sets' tolerance: max |ours - golden| <= rel * max |golden|, per tensor."""
    assert ours.shape == golden.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(golden.shape)}"
    err = (ours.double() - golden.double()).abs().max().item()
    scale = golden.double().abs().max().item()
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    if not (TINY / "config.json").exists():
        pytest.skip(f"reference golden set not found at {TINY} (set OSDIFF_REFERENCE)")
    return TINY


@pytest.fixture(scope="session")
def tiny_config(tiny_dir):
    from osdiff.config import ModelConfig

    return ModelConfig.from_json(tiny_dir / "config.json")


@pytest.fixture(scope="session")
def tiny_state_dict(tiny_dir) -> dict[str, torch.Tensor]:
    """The SD dict updated with the OSDiff dict, as the reference inference.py combines them."""
    sd = torch.load(tiny_dir / "sd21_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd.update(torch.load(tiny_dir / "osdiff_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"])
    return sd


@pytest.fixture(scope="session")
def golden(tiny_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "golden.safetensors"))


@pytest.fixture(scope="session")
def cddm_trace(tiny_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "cddm_trace.safetensors"))


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str, new_prefix: str = "") -> dict[str, torch.Tensor]:
    return {new_prefix + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def tiny_model(tiny_dir, tiny_config):
    from osdiff.export.model import OSDiffModel

    return OSDiffModel.load(tiny_dir / "sd21_tiny.ckpt", tiny_dir / "osdiff_tiny.ckpt", tiny_config)


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tmp_path_factory):
    """The tiny reference model exported once for the whole session (fp32 and fp16)."""
    from osdiff.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("tiny_export")
    export_onnx(tiny_model, out)
    return out


@pytest.fixture(scope="session")
def tiny_image(tiny_dir):
    from osdiff.files import read_image

    return read_image(tiny_dir / "input.png")


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 now (all held open together, so none repeats)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
