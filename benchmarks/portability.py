"""Streams across CPU capabilities: encode under one ATEN_CPU_CAPABILITY, decode under others.

The entropy tables and the model identity are canonical (runtime/f32.py, runtime/entropy.py,
export/model.py weights_digest): every capability agrees on them. The entropy-parameter
networks still run in float, so a scale within a few ulps of a CDF-table boundary (or a value
within a few ulps of a rounding boundary) can still come out on the other side on another
machine, and that stream is then lost (the check value says so). This measures how often: each
image is compressed in a process pinned to one capability and decompressed in processes pinned
to the others, with PyTorch and, with --onnx, ONNX Runtime on an export made under the
encoder's capability. A stream that decompresses passed its check value: every symbol equal.

    python benchmarks/portability.py                            # 100 images, tiny reference model
    python benchmarks/portability.py --images 20 --onnx         # also ONNX Runtime
    python benchmarks/portability.py --sd SD.ckpt --osdiff OSDIFF.ckpt --config full --size 512x768
    python benchmarks/portability.py tables                      # the original's own tables per capability

Prints a table, writes JSON (default benchmarks/results/portability_cpu.json).

`tables` measures how the original implementation's tables (compressai 1.2.4's formulas in
float32 torch, operation by operation, as the reference computes them) relate to our
canonical ones under each capability: the Gaussian tables, the golden set's bottleneck and 30
seeded random full-width (192-channel) bottlenecks of several widths.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = Path(os.environ.get("OSDIFF_REFERENCE", REPO.parent / "shared" / "reference")) / "tiny"
RESULTS = Path(__file__).parent / "results"


def capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run, scalar first."""
    import torch

    best = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["default", best]


def photos(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """n distinct photos: seeded crops, flips and gains of the bundled demo photo, resized
    when the size asks for more than it has."""
    from PIL import Image

    from osdiff.files import read_image

    photo = read_image(REPO / "osdiff" / "assets" / "demo.png")
    scale = max(height / photo.shape[0], width / photo.shape[1], 1.0)
    if scale > 1:
        size = (int(np.ceil(photo.shape[1] * scale)), int(np.ceil(photo.shape[0] * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        crop = photo[top : top + height, left : left + width].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        out.append(np.clip(crop * rng.uniform(0.7, 1.2), 0, 255).astype(np.uint8))
    return out


def _load(args: dict):
    from osdiff.config import ModelConfig
    from osdiff.export.model import OSDiffModel

    config = ModelConfig.named(args["config"]) if args["config"] else ModelConfig.from_json(TINY / "config.json")
    return OSDiffModel.load(args["sd"] or TINY / "sd21_tiny.ckpt", args["osdiff"] or TINY / "osdiff_tiny.ckpt", config)


def _identity(models) -> dict:
    return {"weights_id": models.weights_id.hex(), "tables_id": models.tables_id.hex(), "fingerprint": models.fingerprint.hex()}


def worker(task: str, workdir: Path, args: dict) -> dict:
    """One side of the measurement, in a process whose capability the parent pinned."""
    import torch

    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec
    from osdiff.runtime.coder import StreamError

    model = _load(args)
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability(), "torch": _identity(model.entropy_models)}
    if task == "export":
        from osdiff.export.onnx_export import export_onnx

        export_onnx(model, workdir / "onnx", fp16=False)
        return out
    torch_codec = Codec(TorchBackend(model))
    if task == "encode":
        for i, image in enumerate(photos(args["images"], *args["size"])):
            (workdir / f"{i:04d}.osd").write_bytes(torch_codec.compress(image, seed=i))
        return out
    codecs = {"torch": torch_codec}
    if (workdir / "onnx").is_dir():
        from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(workdir / "onnx")
        out["onnxruntime"] = _identity(backend.models)
        codecs["onnxruntime"] = Codec(backend)
    for name, codec in codecs.items():
        exact, errors = 0, []
        streams = sorted(workdir.glob("*.osd"))
        for path in streams:
            try:
                codec.decompress(path.read_bytes())
                exact += 1
            except StreamError as e:
                errors.append(f"{path.name}: {e}")
        out[f"{name}_decode"] = {"images": len(streams), "symbol_exact": exact, "errors": errors}
    return out


def _run_worker(task: str, capability: str, workdir: Path, args: dict) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, __file__, "worker", task, str(workdir), json.dumps(args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise click.ClickException(f"{task} under {capability} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(images: int, encode: str, decode: list[str], onnx: bool, args: dict) -> dict:
    args = dict(args, images=images)
    with tempfile.TemporaryDirectory(prefix="osdiff-portability-") as tmp:
        workdir = Path(tmp)
        identities = {encode: _run_worker("encode", encode, workdir, args)}
        if onnx:
            _run_worker("export", encode, workdir, args)
        decoded = {cap: _run_worker("decode", cap, workdir, args) for cap in decode}
    ids = [r["torch"] for r in [*identities.values(), *decoded.values()]] + [r["onnxruntime"] for r in decoded.values() if "onnxruntime" in r]
    return {
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        "model": args["sd"] or "tiny reference checkpoints", "size": args["size"], "images": images,
        "encode_capability": encode, "identity_equal_everywhere": all(i == ids[0] for i in ids), "identity": ids[0],
        "decode": {cap: {k: v for k, v in r.items() if k.endswith("_decode")} for cap, r in decoded.items()},
    }


@click.group(invoke_without_command=True)
@click.option("--images", default=100, show_default=True)
@click.option("--encode", "encode_cap", default=None, help="Encoder's capability (default: the CPU's best).")
@click.option("--decode", "decode_caps", default=None, help="Comma-separated decoder capabilities (default: every other one).")
@click.option("--onnx", is_flag=True, help="Also decode with ONNX Runtime, on an export made under the encoder's capability.")
@click.option("--sd", default=None, help="SD 2.1 checkpoint (default: the tiny reference pair).")
@click.option("--osdiff", default=None, help="OSDiff checkpoint.")
@click.option("--config", default=None, help="Model config (default: the tiny reference set's).")
@click.option("--size", default="128x192", show_default=True, help="HxW of the test images.")
@click.option("--json", "json_path", default=str(RESULTS / "portability_cpu.json"), show_default=True)
@click.pass_context
def main(ctx: click.Context, images: int, encode_cap: str | None, decode_caps: str | None, onnx: bool,
         sd: str | None, osdiff: str | None, config: str | None, size: str, json_path: str) -> None:
    if ctx.invoked_subcommand:
        return
    caps = capabilities()
    encode = encode_cap or caps[-1]
    decode = decode_caps.split(",") if decode_caps else [c for c in caps if c != encode] or [encode]
    height, width = (int(v) for v in size.lower().split("x"))
    args = {"sd": sd, "osdiff": osdiff, "config": config, "size": [height, width]}
    result = measure(images, encode, decode, onnx, args)
    print(f"{images} images of {height}x{width}, encoded under {encode}; identity equal everywhere: "
          f"{result['identity_equal_everywhere']}")
    print(f"{'decoder':<10} {'backend':<12} {'symbol-exact':>12}")
    for cap, backends in result["decode"].items():
        for name, r in backends.items():
            print(f"{cap:<10} {name.removesuffix('_decode'):<12} {r['symbol_exact']:>6}/{r['images']:<5}")
            for error in r["errors"][:3]:
                print(f"    {error}")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))
    print(f"wrote {json_path}")


def bottlenecks() -> dict[str, dict]:
    """The golden set's bottleneck and 30 seeded random 192-channel ones (name -> params)."""
    import torch

    from osdiff.export.checkpoint import EB, eb_canonical
    from osdiff.export.model import _random_bottleneck

    sd = torch.load(TINY / "osdiff_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    golden = {eb_canonical(k)[len(EB):]: v.float() for k, v in sd.items() if eb_canonical(k).startswith(EB)}
    out = {"golden set": {k: v for k, v in golden.items() if k.split(".")[0] in ("matrices", "biases", "factors", "quantiles")}}
    for i, (init_scale, support) in enumerate([(1.0, 6.0), (4.0, 12.0), (10.0, 20.0)] * 10):
        with torch.random.fork_rng():
            torch.manual_seed(i)
            out[f"random {i:02d} (init {init_scale:g}, support {support:g})"] = _random_bottleneck(192, init_scale, support)
    return out


def count_differences(ours: list[list[int]], theirs: list[list[int]]) -> int:
    return sum(a != b for x, y in zip(ours, theirs) for a, b in zip(x, y)) + sum(len(x) != len(y) for x, y in zip(ours, theirs))


def tables_worker() -> dict:
    """The original's tables under this process's capability (runtime/f32_native.py: torch's
    float32 kernels), against our canonical ones."""
    import torch

    from osdiff.config import EntropyConfig
    from osdiff.runtime import f32_native
    from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional

    ours, theirs = GaussianConditional(EntropyConfig()), GaussianConditional(EntropyConfig(), f32_native)
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability(),
                 "scale_table": int((ours.scale_table != theirs.scale_table).sum()),
                 "gaussian": count_differences(ours.tables.cdfs, theirs.tables.cdfs)}
    for name, params in bottlenecks().items():
        eb, original = EntropyBottleneck(params), EntropyBottleneck(params, arithmetic=f32_native)
        out[name] = {"entries": sum(len(r) for r in eb.tables.cdfs), "rows": len(eb.tables.cdfs),
                     "differ": count_differences(eb.tables.cdfs, original.tables.cdfs),
                     "rows_differ": sum(x != y for x, y in zip(eb.tables.cdfs, original.tables.cdfs))}
    return out


@main.command("tables")
@click.option("--json", "json_path", default=str(RESULTS / "portability_tables_cpu.json"), show_default=True)
def tables_command(json_path: str) -> None:
    """The original's tables, computed by its float32 torch under each capability, against ours."""
    runs = {}
    for cap in capabilities():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        done = subprocess.run([sys.executable, __file__, "tables-worker"], env=env, capture_output=True, text=True)
        if done.returncode:
            raise click.ClickException(done.stderr[-3000:])
        runs[cap] = json.loads(done.stdout.strip().splitlines()[-1])
    names = [k for k in runs[capabilities()[0]] if isinstance(runs[capabilities()[0]][k], dict)]
    print("entries of the original's tables (float32 torch) that differ from our canonical ones")
    print("(entries, and in brackets the CDF rows, i.e. channels, that differ)")
    print(f"{'table':<40} {'entries':>8} " + " ".join(f"{cap:>16}" for cap in runs))
    first = next(iter(runs.values()))
    print(f"{'scale table':<40} {64:>8} " + " ".join(f"{r['scale_table']:>16}" for r in runs.values()))
    print(f"{'gaussian (64 rows)':<40} {'':>8} " + " ".join(f"{r['gaussian']:>16}" for r in runs.values()))
    for name in names:
        cells = " ".join(f"{r[name]['differ']:>6} ({r[name]['rows_differ']:>3}/{r[name]['rows']})" for r in runs.values())
        print(f"{name:<40} {first[name]['entries']:>8} {cells}")
    differing = {cap: sum(r[n]["differ"] > 0 for n in names) for cap, r in runs.items()}
    print("bottlenecks whose original tables differ from ours: " + ", ".join(f"{c} {n}/{len(names)}" for c, n in differing.items()))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({"host": platform.processor() or platform.machine(), "runs": runs}, indent=1))
    print(f"wrote {json_path}")


@main.command("tables-worker", hidden=True)
def tables_worker_command() -> None:
    print(json.dumps(tables_worker()))


@main.command("worker", hidden=True)
@click.argument("task", type=click.Choice(["encode", "export", "decode"]))
@click.argument("workdir", type=click.Path(exists=True, file_okay=False))
@click.argument("args")
def worker_command(task: str, workdir: str, args: str) -> None:
    print(json.dumps(worker(task, Path(workdir), json.loads(args))))


if __name__ == "__main__":
    main()
