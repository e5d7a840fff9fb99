"""Peak memory of `osdiff compress` and `osdiff decompress` against image size, per backend: what a
user's process peaks at, with the codec's own estimate beside it.

Every measurement is the real command in a fresh process (`python -m osdiff.cli compress ...`, then
`... decompress ...` on the stream it wrote), and its peak is the resident memory the kernel reports
for that process when it ends (the rusage of os.wait4, which is what `/usr/bin/time -v` prints as
"Maximum resident set size"). Each command also runs once on a 64x64 image: that peak (imports,
the model, ONNX Runtime's sessions) is the fixed cost, and bytes per pixel = (peak - fixed) / pixels
should stay flat as the size grows, attention being memory-linear and nothing else quadratic.
The estimate is the codec's (runtime/memory.py) for the same command in a fresh process. Sizes are
megapixels of a 4:3 image of random pixels. Prints a table and writes JSON (--json).

    python benchmarks/memory.py                               # demo config, 1 and 4 MP, torch + onnxruntime
    flock /tmp/osdiff-heavy.lock python benchmarks/memory.py --config full --sizes 12 --backends torch \\
        --max-memory 16G --json benchmarks/results/memory_cpu_full.json   # 12 MP (4000x3000), full size

With --max-memory the codec picks VAE tiles when the whole image would not fit (column "tiles").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from entropy import cpu_flags, cpu_model  # noqa: E402

SIDES = {1: (1152, 864), 4: (2304, 1728), 8: (3264, 2448), 12: (4000, 3000), 16: (4608, 3456)}
GIB = 1024**3


def side(mp: float) -> tuple[int, int]:
    """(width, height) of a 4:3 image of about `mp` megapixels."""
    return SIDES[mp] if mp in SIDES else (int((mp * 1e6 * 4 / 3) ** 0.5), int((mp * 1e6 * 3 / 4) ** 0.5))


def run(cmd: list[str]) -> tuple[int, float]:
    """Run a command to its end; (peak resident bytes, seconds). Raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    out, err = proc.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss * 1024, seconds  # KiB on Linux


def estimate_child(args: argparse.Namespace) -> None:
    """The codec's estimates for compressing and decompressing one image, in a fresh process
    holding what the command would hold before its run (the model, or the export's manifest)."""
    from osdiff.cli.common import open_codec

    codec = open_codec(max_memory=args.max_memory, **json.loads(args.options))
    w, h = side(args.mp)
    print(json.dumps({"compress": codec.estimate(h, w, False, None).total, "decompress": codec.estimate(h, w, True, None).total}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--sizes", default="1,4", help="megapixels, comma-separated")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--max-memory", default=None, help="passed to the codec (default: what the machine has free)")
    p.add_argument("--attention", default="mha", help="attention form of the onnxruntime export "
                                                        "(export/models/attention.py; scan: the form before mha)")
    p.add_argument("--json", default=None)
    p.add_argument("--estimate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--mp", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.estimate:
        return estimate_child(args)

    cli = [sys.executable, "-m", "osdiff.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = work / "onnx"
        if "onnxruntime" in args.backends:
            print(f"exporting the {args.config} model (random weights) ...", file=sys.stderr)
            run(cli + ["export", "--config", args.config, "--random-weights", "--no-fp16", "--attention", args.attention,
                       "-o", str(engines)])
        for backend in args.backends.split(","):
            options = {"backend": backend, "engines": str(engines) if backend == "onnxruntime" else None,
                       "device": "cpu", "precision": "fp32", "provider": "cpu", "sd": None, "osdiff_ckpt": None,
                       "config": args.config, "random_weights": backend == "torch", "weights_seed": 0}
            flags = ["--backend", backend] + (["--engines", str(engines)] if backend == "onnxruntime" else
                                              ["--config", args.config, "--random-weights"])
            flags += ["--max-memory", args.max_memory] if args.max_memory else []
            fixed = {}
            for mp in [0.0] + [float(s) for s in args.sizes.split(",")]:
                w, h = (64, 64) if mp == 0 else side(mp)
                image, stream, decoded = work / f"{w}x{h}.png", work / f"{w}x{h}.osd", work / f"{w}x{h}.out.png"
                Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
                print(f"{backend} {h}x{w} (HxW) ...", file=sys.stderr, flush=True)
                try:
                    c_peak, c_s = run(cli + ["compress", str(image), "-o", str(stream)] + flags)
                    d_peak, d_s = run(cli + ["decompress", str(stream), "-o", str(decoded)] + flags)
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    rows.append({"backend": backend, "megapixels": mp, "error": str(e)[-500:]})
                    continue
                if mp == 0:
                    fixed = {"compress": c_peak, "decompress": d_peak}
                    continue
                est = json.loads(subprocess.run(
                    [sys.executable, __file__, "--estimate", "--mp", str(mp), "--options", json.dumps(options)]
                    + (["--max-memory", args.max_memory] if args.max_memory else []),
                    check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                from osdiff.runtime.bitstream import OsdStream, tile_grid

                row = {"backend": backend, "attention": args.attention if backend == "onnxruntime" else "sdpa",
                       "config": args.config, "width": w, "height": h, "megapixels": w * h / 1e6,
                       "tiles": tile_grid(OsdStream.from_bytes(stream.read_bytes())), "bytes": stream.stat().st_size,
                       "compress_peak": c_peak, "decompress_peak": d_peak, "compress_fixed": fixed["compress"],
                       "decompress_fixed": fixed["decompress"], "estimate_compress": est["compress"],
                       "estimate_decompress": est["decompress"], "compress_s": c_s, "decompress_s": d_s}
                rows.append(row)
                print_row(row)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(sys.argv), "config": args.config, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "cpus": os.cpu_count(),
            "what": "peak resident memory of `osdiff compress` and of `osdiff decompress`, each a fresh process "
                    "(os.wait4 rusage, as /usr/bin/time reports it); *_fixed: the same command on a 64x64 image",
            "runs": rows}, indent=1))


def print_row(r: dict) -> None:
    px = r["width"] * r["height"]
    cells = []
    for what in ("compress", "decompress"):
        peak = r[f"{what}_peak"]
        cells.append(f"{what} peak {peak / GIB:5.2f} GiB ({(peak - r[f'{what}_fixed']) / px:4.0f} B/px, "
                     f"estimate {r[f'estimate_{what}'] / GIB:5.2f}, {r[f'{what}_s']:6.1f} s)")
    print(f"{r['backend']:<12}{r['height']}x{r['width']:<6} {r['megapixels']:5.1f} MP  " + "  ".join(cells)
          + f"  tiles {r['tiles']}", flush=True)


if __name__ == "__main__":
    main()
