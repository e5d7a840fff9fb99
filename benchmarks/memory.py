"""Peak memory of compress + decompress against image size, per backend; the estimate beside it.

Each (backend, size) runs in a fresh process whose peak resident memory (ru_maxrss) is read by
the parent, so one run's arena or allocator cache never inflates the next. Sizes are megapixels
of a 4:3 image of random pixels. Prints a table and writes JSON (--json).

    python benchmarks/memory.py                               # demo config, 1/4/16 MP, torch + onnxruntime
    flock /tmp/osdiff-heavy.lock python benchmarks/memory.py --config full --sizes 12 --backends torch \\
        --json benchmarks/results/memory_cpu_full.json        # 12 MP (4000x3000) on the full-size model

Memory per pixel ("bytes/px": the peak minus the process before the run, over the pixels) should
stay flat as the size grows: attention is computed in blocks and nothing else is quadratic. With
--max-memory the codec picks VAE tiles when the whole image would not fit (column "tiles").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = {1: (1152, 864), 4: (2304, 1728), 8: (3264, 2448), 12: (4000, 3000), 16: (4608, 3456)}


def child(args: argparse.Namespace) -> None:
    """One run: load, measure the process, compress and decompress once, print JSON."""
    import numpy as np
    import torch

    from osdiff.config import ModelConfig
    from osdiff.runtime import memory
    from osdiff.runtime.bitstream import OsdStream, tile_grid
    from osdiff.runtime.codec import Codec

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = ModelConfig.named(args.config)
    if args.backend == "torch":
        from osdiff.export.model import OSDiffModel
        from osdiff.runtime.backends.torch_backend import TorchBackend

        backend = TorchBackend(OSDiffModel.random(cfg, seed=0))
    else:
        from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(args.engines)
    limit = memory.parse_size(args.max_memory) if args.max_memory else None
    codec = Codec(backend, max_memory=limit)
    w, h = SIDES[args.mp] if args.mp in SIDES else (int((args.mp * 1e6 * 4 / 3) ** 0.5), int((args.mp * 1e6 * 3 / 4) ** 0.5))
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    before = memory.process_rss()
    t0 = time.perf_counter()
    data = codec.compress(image)
    t1 = time.perf_counter()
    print(f"compressed in {t1 - t0:.1f} s, peak so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", file=sys.stderr, flush=True)
    grid = tile_grid(OsdStream.from_bytes(data))
    from osdiff.runtime.tiling import TileGrid

    est = [codec.estimate(h, w, d, None if grid is None else TileGrid(*grid)) for d in (False, True)]
    out = codec.decompress(data)
    t2 = time.perf_counter()
    assert out.shape == image.shape
    print(json.dumps({
        "backend": args.backend, "config": args.config, "width": w, "height": h, "megapixels": w * h / 1e6,
        "tiles": grid, "rss_before": before, "estimate_compress": est[0].total, "estimate_decompress": est[1].total,
        "compress_s": t1 - t0, "decompress_s": t2 - t1, "bytes": len(data),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--sizes", default="1,4,16", help="megapixels, comma-separated")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--max-memory", default=None, help="passed to the codec (default: what the machine has free)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--mp", type=float, help=argparse.SUPPRESS)
    p.add_argument("--engines", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = None
        if "onnxruntime" in args.backends:
            from osdiff.config import ModelConfig
            from osdiff.export.model import OSDiffModel
            from osdiff.export.onnx_export import export_onnx

            engines = str(Path(tmp) / "onnx")
            export_onnx(OSDiffModel.random(ModelConfig.named(args.config), seed=0), engines, fp16=False)
        for backend in args.backends.split(","):
            for mp in (float(s) for s in args.sizes.split(",")):
                cmd = [sys.executable, __file__, "--child", "--backend", backend, "--mp", str(mp), "--config", args.config]
                cmd += ["--engines", engines] if engines else []
                cmd += ["--max-memory", args.max_memory] if args.max_memory else []
                # stderr passes through: a long run's progress shows while it runs.
                res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
                if res.returncode != 0:
                    print(f"{backend} {mp} MP failed (exit {res.returncode}; its stderr is above)", file=sys.stderr)
                    rows.append({"backend": backend, "megapixels": mp, "error": f"exit {res.returncode}"})
                    continue
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print_row(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "cpus": os.cpu_count(), "runs": rows}, indent=1))


def print_row(r: dict) -> None:
    gib = 1024**3
    peak = r["peak_rss"]
    per_px = (peak - r["rss_before"]) / (r["width"] * r["height"])
    print(f"{r['backend']:<12}{r['width']}x{r['height']:<6}{r['megapixels']:6.1f} MP  peak {peak / gib:6.2f} GiB"
          f"  before {r['rss_before'] / gib:5.2f} GiB  {per_px:6.0f} bytes/px  estimate {max(r['estimate_compress'], r['estimate_decompress']) / gib:6.2f} GiB"
          f"  tiles {r['tiles']}  compress {r['compress_s']:6.1f} s  decompress {r['decompress_s']:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
