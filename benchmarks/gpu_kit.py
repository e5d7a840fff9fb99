"""Pack what the GPU check needs and the lent GPU machine lacks (run on the CPU machine: `make gpu-kit`).

The GPU machine has no network and receives only a copy of the working tree plus at most eight
git-ignored paths named in the device tool's `carry` (64 MiB in all). Everything the kit needs
goes into ONE git-ignored folder, carried as one path:

    .gpu-kit/wheels/        cp312 manylinux wheels missing from the machine's image
    .gpu-kit/OSDiff/        the original implementation (github.com/cheesejiang/OSDiff), as files
    .gpu-kit/reference/tiny the golden set's checkpoints that the `gpu` tests load
    .gpu-kit/MANIFEST.json  what is there, from where, and how large

Then it prints the size of what will travel (tracked and untracked-not-ignored files plus the
kit) and fails if that is over the limit. Standard library only: it runs with any python3.

    python3 benchmarks/gpu_kit.py [--out .gpu-kit] [--original PATH_OR_URL] [--reference DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64  # the device tool's limit on what travels
WARN_MIB = 48  # "well under" the limit: leave room for the results and the repository's growth
ORIGINAL_URL = "https://github.com/cheesejiang/OSDiff"

# Wheels the GPU machine's image lacks (its package list: the device README's KINDS.md). One
# version each: two of one package stop the whole offline install there.
#  - compressai: the engine loads its two C++ extensions; the original imports its Python package.
#    1.2.8 is the oldest release with cp312 wheels (the original pins 1.2.4: no cp312 wheel).
#  - pytorch-msssim: `import compressai` imports it (compressai.losses).
#  - open_clip_torch 2.22 (the original's pin), ftfy and wcwidth: the original's text encoder.
#  - omegaconf 2.3 (+ antlr4 runtime 4.9, which PyPI has only as a source archive: built here
#    into a pure-Python wheel): the original reads its config with it.
# Everything else they import (torchvision, timm, regex, pyyaml, einops, tqdm, torch-geometric,
# huggingface-hub) is in the image.
BINARY_WHEELS = ["compressai==1.2.8", "pytorch-msssim==1.0.0", "open_clip_torch==2.22.0", "omegaconf==2.3.0",
                 "ftfy==6.3.1", "wcwidth==0.2.13"]
SOURCE_WHEELS = ["antlr4-python3-runtime==4.9.3"]
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]

# The parts of the original checkout that inference imports; the rest (a 2 MB poster, the
# training data loaders) stays behind.
ORIGINAL_PARTS = ["inference.py", "configs", "ldm", "model", "utils", "LICENSE", "README.md"]
# The golden set's files the `gpu` tests read (tests/conftest.py: tiny_config, tiny_model, tiny_image).
REFERENCE_FILES = ["config.json", "sd21_tiny.ckpt", "osdiff_tiny.ckpt", "input.png"]


def run(*cmd: str, cwd: Path | None = None) -> str:
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, cwd=cwd, check=True, text=True, stdout=subprocess.PIPE).stdout


def fetch_wheels(dest: Path) -> list[str]:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    run(*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platforms, "-d", str(dest), *BINARY_WHEELS)
    with tempfile.TemporaryDirectory() as tmp:
        # pure-Python source archives: a py3-none-any wheel built here installs there
        run(*pip, "wheel", "--no-deps", "-w", tmp, *SOURCE_WHEELS)
        for whl in Path(tmp).glob("*.whl"):
            if not whl.name.endswith("-py3-none-any.whl"):
                raise SystemExit(f"{whl.name} is not a pure-Python wheel: it would not install on the GPU machine")
            shutil.copy(whl, dest)
    names = sorted(p.name for p in dest.glob("*.whl"))
    wanted = len(BINARY_WHEELS) + len(SOURCE_WHEELS)
    if len(names) != wanted:
        raise SystemExit(f"expected {wanted} wheels, got {names}")
    return names


def fetch_original(source: str, dest: Path) -> str:
    """Files of the original implementation at one commit (no .git: nothing of it is tracked here).
    `source`: a working checkout, a bare git directory (as the device tool's `fetch` gives), or a URL."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        if Path(source).exists():
            path = Path(source)
            git = ["git", f"--git-dir={path}"] if (path / "HEAD").is_file() and not (path / ".git").exists() else ["git", "-C", str(path)]
        else:
            run("git", "clone", "--depth", "1", "--quiet", source, f"{tmp}/clone")
            git = ["git", "-C", f"{tmp}/clone"]
        commit = run(*git, "rev-parse", "HEAD").strip()
        archive = Path(tmp) / "original.tar"
        run(*git, "archive", "--format=tar", "-o", str(archive), "HEAD", *ORIGINAL_PARTS)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    for cache in list(dest.rglob("__pycache__")):  # the repository tracks .pyc files of Python 3.8-3.10
        shutil.rmtree(cache)
    return commit


def copy_reference(source: Path, dest: Path) -> None:
    missing = [f for f in REFERENCE_FILES if not (source / f).is_file()]
    if missing:
        raise SystemExit(f"golden set {source} lacks {missing} (set --reference or OSDIFF_REFERENCE)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in REFERENCE_FILES:
        shutil.copy(source / f, dest / f)


def tree_bytes(kit: Path) -> tuple[int, int]:
    """(bytes of the working tree that travels, bytes of the kit)."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).split("\0")
    tree = sum((REPO / f).stat().st_size for f in listed if f and (REPO / f).is_file())
    kit_bytes = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    return tree, kit_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / ".gpu-kit"), help="the kit folder (must be git-ignored)")
    ap.add_argument("--original", default=os.environ.get("OSDIFF_ORIGINAL", ORIGINAL_URL),
                    help="checkout, bare git directory or URL of cheesejiang/OSDiff")
    ap.add_argument("--reference", default=os.environ.get("OSDIFF_REFERENCE", str(REPO.parent / "shared" / "reference")),
                    help="the golden-data folder holding tiny/")
    ap.add_argument("--requirements", action="store_true",
                    help="print the requirements the kit carries as wheels, and stop (make test-gpu-image installs them)")
    args = ap.parse_args()
    if args.requirements:
        print(" ".join(BINARY_WHEELS + SOURCE_WHEELS))
        return
    kit = Path(args.out).resolve()
    kit.mkdir(parents=True, exist_ok=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(kit)], cwd=REPO).returncode == 0
    if kit.is_relative_to(REPO) and not ignored:
        raise SystemExit(f"{kit} is not git-ignored: it would travel twice (as the tree and as a carried path)")

    wheels = fetch_wheels(kit / "wheels")
    commit = fetch_original(args.original, kit / "OSDiff")
    copy_reference(Path(args.reference) / "tiny", kit / "reference" / "tiny")
    tree, kit_bytes = tree_bytes(kit)
    manifest = {"wheels": wheels, "original": {"source": args.original, "commit": commit, "parts": ORIGINAL_PARTS},
                "reference": REFERENCE_FILES, "tree_bytes": tree, "kit_bytes": kit_bytes}
    (kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")

    total = (tree + kit_bytes) / 2**20
    rel = kit.relative_to(REPO) if kit.is_relative_to(REPO) else kit
    print(f"\nGPU kit in {rel}: {len(wheels)} wheels, OSDiff at {commit[:10]}, golden set tiny/")
    print(f"what travels: working tree {tree / 2**20:.1f} MiB + kit {kit_bytes / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {LIMIT_MIB} MiB)")
    print(f"on the GPU machine: run(command='benchmarks/gpu_check.sh $OUT', carry=['{rel}'])")
    if total > LIMIT_MIB:
        raise SystemExit(f"{total:.1f} MiB is over the {LIMIT_MIB} MiB the device tool carries")
    if total > WARN_MIB:
        print(f"warning: {total:.1f} MiB is close to the limit", file=sys.stderr)


if __name__ == "__main__":
    main()
