"""How the encoder should pad an image to the pad multiple: bpp and PSNR per padding mode.

The .osd stream stores the image size and the decoder only crops, so the encoder may fill the
padding however it likes (runtime/codec.py PADDINGS). This runs real streams of the built-in
demo model (PyTorch, CPU) on crops of odd sizes of scikit-image's photographs that its
training held out (chelsea, coffee, rocket; training/data.py), once per padding mode, and
reports per size the mean over the photos of

    bpp        8 x stream bytes / pixels of the unpadded image
    PSNR       8-bit RGB, over the unpadded image
    edge PSNR  the same over the band of 8 pixels along the bottom and right sides, where the
               padding's content is nearest (the whole image when it is smaller)
    edge bias  mean of decoded - original in that band, grey levels (negative: darker)

Crops are centred. 1x1 is three single pixels (one per photo); "full" is each photo whole;
1050x1680 (a 1680x1050 landscape photo) is rocket (427x640) upscaled 2.625x with Pillow's
bicubic filter to 1121x1680 and centre-cropped, since none of the photos is that large.

    flock /tmp/osdiff-heavy.lock python benchmarks/padding.py    # all sizes: 45 min on 2 busy cores, most for 1050x1680
    python benchmarks/padding.py --sizes 1x1,70x90 --json /tmp/padding.json     # a quick look

Prints a table and writes JSON (default benchmarks/results/padding_cpu_demo.json).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from entropy import cpu_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PHOTOS = ("chelsea", "coffee", "rocket")
SIZES = "1x1,33x33,70x90,100x150,161x241,full,1050x1680"
BAND = 8


def photo(name: str) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[..., :3])


def crops(size: str) -> list[tuple[str, np.ndarray]]:
    """(photo name, crop) for one size."""
    if size == "full":
        return [(p, photo(p)) for p in PHOTOS]
    h, w = (int(v) for v in size.split("x"))
    if size == "1050x1680":
        from PIL import Image

        src = photo("rocket")
        scale = w / src.shape[1]
        big = np.asarray(Image.fromarray(src).resize((w, round(src.shape[0] * scale)), Image.BICUBIC))
        top = (big.shape[0] - h) // 2
        return [("rocket x2.625", np.ascontiguousarray(big[top : top + h, :w]))]
    out = []
    for p in PHOTOS:
        src = photo(p)
        top, left = (src.shape[0] - h) // 2, (src.shape[1] - w) // 2
        out.append((p, np.ascontiguousarray(src[top : top + h, left : left + w])))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def edge_band(image: np.ndarray) -> np.ndarray:
    """The pixels within BAND of the bottom or right side, flattened to N x 3."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), bool)
    mask[max(0, h - BAND) :, :] = True
    mask[:, max(0, w - BAND) :] = True
    return image[mask]


def measure(codec, image: np.ndarray, mode: str) -> dict:
    t0 = time.perf_counter()
    data = codec.compress(image, padding=mode)
    decoded = codec.decompress(data)
    h, w = image.shape[:2]
    band_in, band_out = edge_band(image), edge_band(decoded)
    return {"bytes": len(data), "bpp": 8 * len(data) / (h * w), "psnr": psnr(image, decoded),
            "edge_psnr": psnr(band_in, band_out),
            "edge_bias": float(np.mean(band_out.astype(np.float64) - band_in.astype(np.float64))),
            "seconds": time.perf_counter() - t0}


@click.command()
@click.option("--sizes", default=SIZES, show_default=True, help="HxW crops, 'full' for the whole photos.")
@click.option("--modes", default="constant,edge,reflect,symmetric", show_default=True, help="numpy.pad modes.")
@click.option("--json", "json_path", default=str(RESULTS / "padding_cpu_demo.json"), show_default=True)
def main(sizes: str, modes: str, json_path: str) -> None:
    import torch

    from osdiff.builtin import load_builtin
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    codec = Codec(TorchBackend(load_builtin()))
    mode_list = modes.split(",")
    rows = []
    for size in sizes.split(","):
        for name, image in crops(size):
            for mode in mode_list:
                r = {"size": size, "photo": name, "height": image.shape[0], "width": image.shape[1], "mode": mode,
                     **measure(codec, image, mode)}
                rows.append(r)
                print(f"  {size:>10} {name:<14} {mode:<10} {r['bpp']:9.4f} bpp {r['psnr']:6.2f} dB "
                      f"(edge {r['edge_psnr']:6.2f} dB, bias {r['edge_bias']:+6.1f}) {r['seconds']:6.1f} s",
                      file=sys.stderr, flush=True)

    summary = []
    for size in dict.fromkeys(r["size"] for r in rows):
        entry: dict = {"size": size, "photos": len({r["photo"] for r in rows if r["size"] == size})}
        for mode in mode_list:
            sel = [r for r in rows if r["size"] == size and r["mode"] == mode]
            entry[mode] = {k: float(np.mean([r[k] for r in sel])) for k in ("bpp", "psnr", "edge_psnr", "edge_bias")}
        summary.append(entry)

    head = f"{'size (HxW)':>11} " + " ".join(f"{m + ' bpp':>15} {'PSNR':>6} {'edge':>6} {'bias':>5}" for m in mode_list)
    lines = [head]
    for e in summary:
        cells = [f"{e[m]['bpp']:>15.4f} {e[m]['psnr']:>6.2f} {e[m]['edge_psnr']:>6.2f} {e[m]['edge_bias']:>+5.1f}"
                 for m in mode_list]
        lines.append(f"{e['size']:>11} " + " ".join(cells))
    print("\n".join(lines))
    print(f"means over the photos; PSNR and edge PSNR in dB, edge bias in grey levels; built-in demo model "
          f"(pad multiple {codec.cfg.pad_multiple}), PyTorch on {cpu_model()}")

    result = {
        "what": "bpp and PSNR of the built-in demo model's .osd streams per encoder padding mode (benchmarks/padding.py)",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()},
        "model": "built-in demo model (osdiff/assets/demo_model.safetensors), PyTorch backend",
        "pad_multiple": codec.cfg.pad_multiple, "edge_band_px": BAND, "modes": mode_list,
        "summary": summary, "rows": rows,
    }
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
