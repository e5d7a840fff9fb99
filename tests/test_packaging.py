"""The top-level folders install as one namespace, `osdiff`, editable and as a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

MODULES = ["osdiff.cli", "osdiff.export.model", "osdiff.export.models.unet", "osdiff.runtime.codec",
           "osdiff.runtime.backends.onnxruntime_backend", "osdiff.engine.profiles", "osdiff.calibration.precision",
           "osdiff.serving.models",
           "osdiff.evaluation.run", "osdiff.evaluation.compare"]
CHECK = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; import osdiff.export; print(osdiff.export.__file__)"


def test_editable_install_maps_the_folders():
    out = subprocess.run([sys.executable, "-c", CHECK, *MODULES], capture_output=True, text=True, check=True, cwd="/")
    assert Path(out.stdout.strip()) == REPO / "export" / "__init__.py"


def test_built_wheel_installs_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("osdiff_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "osdiff/assets/demo.png" in names and "osdiff/assets/demo_model.safetensors" in names
    assert not any(n.startswith(("export/", "runtime/", "engine/", "calibration/", "serving/", "evaluation/", "tests/")) for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", CHECK, *MODULES], capture_output=True, text=True, check=True, cwd="/", env=env)
    assert Path(out.stdout.strip()) == site / "osdiff" / "export" / "__init__.py"
    assert (site / "bin" / "osdiff").exists()
