"""Our denoiser stage against the original's UNet + control step, side by side, same weights and
inputs, in one process.

The original's `UNetModel` and `CDDM` are imported unmodified from a checkout
(benchmarks/original.py), built from its config with our sizes, and given our weights; both
evaluate eps at t = 999 on the same x_T, hint and context, alternately, and the table gives the
median of each and their ratio, plus the largest difference of eps (relative to max |eps|).
With --profile, the top operators of our stage by self CPU time (torch.profiler).

    python benchmarks/denoiser.py --original .gpu-kit/OSDiff [--config full --size 128x192 --runs 5]

Full size needs about 11 GB of memory (both models, plus the original's throw-away copy of the
UNet that CDDM builds to count channels).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent))
import original as orig  # noqa: E402

from osdiff.config import ModelConfig  # noqa: E402
from osdiff.export.models.unet import Denoiser  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build_pair(checkout: Path, cfg: ModelConfig, seed: int) -> tuple[Denoiser, torch.nn.Module, torch.nn.Module]:
    """(ours, the original's UNetModel, the original's CDDM), with our random weights in both."""
    torch.manual_seed(seed)
    ours = Denoiser(cfg.unet, cfg.control, cfg.diffusion, cfg.text.context_length).eval().requires_grad_(False)
    ours.context.normal_()
    mods = orig.import_original(checkout)
    conf = orig.original_config(checkout, cfg).params
    instantiate = mods["utils.common"].instantiate_from_config
    unet = instantiate(conf.unet_config).eval().requires_grad_(False)
    control = instantiate(conf.control_stage_config).eval().requires_grad_(False)
    sd = ours.state_dict()
    unet.load_state_dict({k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}, strict=True)
    control.load_state_dict({k[len("control."):]: v for k, v in sd.items() if k.startswith("control.")}, strict=True)
    return ours, unet, control


def timed_ms(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@click.command()
@click.option("--original", "checkout", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A checkout of cheesejiang/OSDiff (make gpu-kit puts one in .gpu-kit/OSDiff).")
@click.option("--config", default="full", show_default=True)
@click.option("--size", default="128x192", show_default=True, help="image size HxW (the latent is 1/8)")
@click.option("--runs", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--profile", is_flag=True, help="print the top operators of our stage (torch.profiler)")
@click.option("--json", "json_path", default=None, help="default: benchmarks/results/denoiser_cpu_<config>.json")
def main(checkout: Path, config: str, size: str, runs: int, threads: int, seed: int, profile: bool,
         json_path: str | None) -> None:
    torch.set_num_threads(threads)
    cfg = ModelConfig.named(config)
    h, w = (int(v) // cfg.latent_downsample for v in size.lower().split("x"))
    t0 = time.perf_counter()
    ours, unet, control = build_pair(checkout.resolve(), cfg, seed)
    print(f"models ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    g = torch.Generator().manual_seed(seed + 1)
    x_T = torch.randn(1, cfg.unet.in_channels, h, w, generator=g)
    hint = torch.randn(1, cfg.control.hint_channels, h, w, generator=g)
    context = ours.context
    t_ours = torch.full((1,), ours.timestep, dtype=torch.long)
    t_orig = torch.full((1,), ours.timestep, dtype=torch.long)

    def run_ours() -> torch.Tensor:
        return ours.eps(x_T, hint, t_ours, context)

    def run_original() -> torch.Tensor:
        return control(x=x_T, hint=hint, timesteps=t_orig, context=context, base_model=unet)

    with torch.inference_mode():
        eps_ours, eps_orig = run_ours(), run_original()  # also the warm-up
        err = float((eps_ours - eps_orig).abs().max() / eps_orig.abs().max())
        times: dict[str, list[float]] = {"ours": [], "original": []}
        for _ in range(runs):  # alternate, so that both see the same machine load
            times["ours"] += timed_ms(run_ours, 1)
            times["original"] += timed_ms(run_original, 1)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                run_ours()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["original"]
    print(f"{cfg.name} denoiser (UNet + control, one eps evaluation), latent {h}x{w}, {threads} threads, "
          f"median of {runs} alternating runs")
    print(f"{'':12}{'median ms':>11}{'min ms':>10}")
    for k, v in times.items():
        print(f"{k:12}{med[k]:>11.1f}{min(v):>10.1f}")
    print(f"ours / original: {ratio:.2f}   max |eps_ours - eps_original| / max |eps|: {err:.2e}")
    out = Path(json_path) if json_path else RESULTS / f"denoiser_cpu_{cfg.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "denoiser", "command": " ".join([sys.executable, *sys.argv]), "config": cfg.name,
        "latent": [h, w], "threads": threads, "runs": runs, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "median_ms": med, "runs_ms": times, "ours_over_original": ratio,
        "max_rel_diff_eps": err,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
