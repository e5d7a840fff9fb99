"""The recipe of the built-in demo model (osdiff/assets/demo_model.safetensors): one command,
`osdiff train --builtin -o DIR`, from a fixed seed.

No pretrained Stable Diffusion exists at the demo size, so this differs from the paper in
two places, both forced by that: (1) stage A trains the demo-sized VAE as an autoencoder
first (training/autoencoder.py), which stays frozen afterwards, as SD's VAE does in the
paper; (2) in stage B the demo-sized UNet is trained together with the LFGCM and the control
module (the paper keeps a pretrained SD UNet frozen), and the learning rate is higher than the
paper's 1e-4 (with warm-up and cosine decay) because everything starts from scratch and the
budget is 90 CPU minutes. Stage B is otherwise the paper's objective (training/objective.py).

Stages write into DIR and are skipped when their output exists, so an interrupted run
continues where it stopped (stage B resumes from its last checkpoint):
    vae.pt            stage A: the autoencoder and its loss history
    osdiff.ckpt       stage B: the training checkpoint (Lightning layout; `osdiff export` reads it)
    demo_model.safetensors   the shipped weights: inference keys only, float16
    results.json, loss_curves.png   held-out evaluation and the loss curves
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from osdiff.config import ModelConfig
from osdiff.files import write_atomic
from osdiff.training.autoencoder import normalize_latent, vae_losses
from osdiff.training.data import TRAIN_PHOTOS, RandomCrops, skimage_photo
from osdiff.training.loop import Trainer, TrainSettings
from osdiff.training.objective import OSDiffTraining


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    # stage A: the autoencoder
    vae_steps: int = 300
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    kl_weight: float = 3e-5
    # stage B: the OSDiff objective
    steps: int = 2000
    batch: int = 4
    crop: int = 96
    lr: float = 1e-3
    warmup: int = 50
    decay_at: int = 700  # then lr / 10: the one-step denoiser's precision needs the smaller steps
    rate_weight: float = 1.0  # lambda (the paper's 1 or 2)


def train_builtin(out: str | Path, recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> Path:
    """Run (or continue) every stage; returns the path of the shipped-weights file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.demo()
    images = [skimage_photo(n) for n in TRAIN_PHOTOS]
    t0 = time.perf_counter()

    vae_path = out / "vae.pt"
    if not vae_path.exists():
        log(f"stage A: autoencoder, {recipe.vae_steps} steps of {recipe.vae_batch} crops of {recipe.vae_crop}px")
        state = train_autoencoder(cfg, images, recipe, log)
        state["recipe"] = _stage_a(recipe)
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(vae_path, buf.getvalue())
    vae = torch.load(vae_path, map_location="cpu", weights_only=True)
    if vae.get("recipe") != _stage_a(recipe):
        raise ValueError(f"{vae_path} was made by another recipe; use another output folder")

    ckpt = out / "osdiff.ckpt"
    settings = TrainSettings(steps=recipe.steps, rate_weight=recipe.rate_weight, lr=recipe.lr, d_lr=recipe.lr,
                             warmup=recipe.warmup, decay_at=recipe.decay_at, seed=recipe.seed)
    if ckpt.exists():
        trainer = Trainer.resume(ckpt, settings=settings)
        log(f"stage B: resuming at step {trainer.global_step}")
    else:
        trainer = Trainer(initial_model(cfg, vae, recipe.seed), settings)
    batches = RandomCrops(images, recipe.crop, recipe.batch, recipe.seed + 1)
    for _ in range(trainer.global_step):  # the same batches after a resume
        next(batches)
    if trainer.global_step < recipe.steps:
        log(f"stage B: OSDiff objective, {recipe.steps} steps of {recipe.batch} crops of {recipe.crop}px")
        trainer.train(batches, recipe.steps, log=log, log_every=25, checkpoint=ckpt, checkpoint_every=100)
    wall, cpu = time.perf_counter() - t0, time.process_time()
    log(f"training done: {wall:.0f} s wall, {cpu:.0f} s CPU (this process, {torch.get_num_threads()} threads)")
    timing = out / "timing.json"
    runs = json.loads(timing.read_text())["runs"] if timing.exists() else []
    runs.append({"wall_s": round(wall), "cpu_s": round(cpu), "threads": torch.get_num_threads(),
                 "stage_b_steps": trainer.global_step})
    write_atomic(timing, json.dumps({"runs": runs}, indent=1).encode())

    weights = out / "demo_model.safetensors"
    write_weights(trainer.model, weights)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    return weights


def _stage_a(recipe: Recipe) -> dict:
    return {k: v for k, v in asdict(recipe).items() if k == "seed" or k.startswith(("vae_", "kl_"))}


def train_autoencoder(cfg: ModelConfig, images: list[np.ndarray], recipe: Recipe,
                      log: Callable[[str], None]) -> dict:
    from osdiff.export.models.vae import VAEDecoder, VAEEncoder

    torch.manual_seed(recipe.seed)
    enc, dec = VAEEncoder(cfg.vae, cfg.diffusion.scale_factor), VAEDecoder(cfg.vae, cfg.diffusion.scale_factor)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vae_lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps,
                                                pct_start=0.05, final_div_factor=20)
    batches = RandomCrops(images, recipe.vae_crop, recipe.vae_batch, recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    history = []
    t0 = time.perf_counter()
    for step in range(1, recipe.vae_steps + 1):
        losses = vae_losses(enc, dec, next(batches), recipe.kl_weight, generator)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append({k: float(v.detach()) for k, v in losses.items()} | {"step": step})
        if step % 50 == 0 or step == recipe.vae_steps:
            recent = history[-50:]
            rec = float(np.mean([r["rec"] for r in recent]))
            log(f"  vae step {step}/{recipe.vae_steps} ({time.perf_counter() - t0:.0f} s): rec {rec:.5f} "
                f"({-10 * np.log10(rec):.2f} dB), kl {np.mean([r['kl'] for r in recent]):.3f}")
    sample = next(RandomCrops(images, 128, 16, recipe.seed + 2))
    k = normalize_latent(enc, dec, sample)
    log(f"  latent scaled by {k:.4g} to unit variance")
    return {"vae_encoder": enc.state_dict(), "vae_decoder": dec.state_dict(), "history": history}


def initial_model(cfg: ModelConfig, vae: dict, seed: int) -> OSDiffTraining:
    """Stage B's starting point: seeded initialization, the stage-A autoencoder, f_d copied
    from the UNet."""
    torch.manual_seed(seed)
    model = OSDiffTraining(cfg, train_unet=True)
    model.stages["vae_encoder"].load_state_dict(vae["vae_encoder"])
    model.stages["vae_decoder"].load_state_dict(vae["vae_decoder"])
    model.refresh_context()
    model.guidance_model.init_from_unet(model.denoiser.unet)
    return model


def write_weights(model: OSDiffTraining, path: Path) -> None:
    """The inference keys of the checkpoint (no discriminator), as float16 safetensors: what
    ships in the package (the loader reads them through OSDiffModel.load, in float32)."""
    from safetensors.torch import save

    state = {k: v.half().contiguous() for k, v in model.checkpoint_state_dict(with_guidance=False).items()}
    write_atomic(path, save(state, metadata={"format": "pt", "model": "osdiff demo (built-in)"}))


def report_builtin(out: str | Path, results_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate DIR/demo_model.safetensors (as shipped: float16, through the normal loader) on
    the held-out photos with real streams, next to JPEG; write results.json and
    loss_curves.png into DIR (and copies into results_dir)."""
    from safetensors.torch import load_file

    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec
    from osdiff.training.data import HELD_OUT_PHOTOS
    from osdiff.training.evaluate import evaluate, table

    out = Path(out)
    weights = out / "demo_model.safetensors"
    cfg = ModelConfig.demo()
    model = OSDiffModel.load(None, weights, cfg)
    training_model = OSDiffTraining(cfg)
    training_model.load_checkpoint_state_dict(load_file(str(weights)))
    rows = evaluate(Codec(TorchBackend(model)), training_model, {n: skimage_photo(n) for n in HELD_OUT_PHOTOS})
    log(table(rows))
    ckpt = torch.load(out / "osdiff.ckpt", map_location="cpu", weights_only=True)
    vae = torch.load(out / "vae.pt", map_location="cpu", weights_only=True)
    results = {
        "weights": weights.name,
        "sha256": __import__("hashlib").sha256(weights.read_bytes()).hexdigest(),
        "bytes": weights.stat().st_size,
        "recipe": json.loads((out / "recipe.json").read_text()),
        "held_out": [r.to_dict() for r in rows],
        "mean": {k: float(np.mean([getattr(r, k) for r in rows]))
                 for k in ("bpp", "estimated_bpp", "psnr", "ms_ssim", "jpeg_bpp", "jpeg_psnr", "jpeg_ms_ssim",
                           "vae_psnr", "hint_psnr")},
    }
    timing = out / "timing.json"
    if timing.exists():
        results["timing"] = json.loads(timing.read_text())
    plot_loss_curves(vae["history"], ckpt["osdiff_training"]["history"], out / "loss_curves.png")
    write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(results_dir / "demo_model_training.json", json.dumps(results, indent=1).encode())
        write_atomic(results_dir / "demo_model_loss_curves.png", (out / "loss_curves.png").read_bytes())
    return results


def plot_loss_curves(vae_history: list[dict], history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v: list[float], n: int = 25) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.convolve(v, np.ones(n) / n, mode="valid") if len(v) > n else v

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(smooth([-10 * np.log10(r["rec"]) for r in vae_history]))
    ax.set(title="stage A: autoencoder", xlabel="step", ylabel="reconstruction PSNR of training crops (dB)")
    ax = axes[1]
    for key in ("diff", "feature"):
        ax.plot(smooth([r[key] for r in history]), label=f"L_{key}")
    ax.set(title="stage B: latent losses", xlabel="step", yscale="log")
    ax.legend()
    ax = axes[2]
    for key, label in (("rate", "L_rate (noisy, bpp)"), ("q_rate", "rate of rounded latents (bpp)"),
                       ("generator", "L_G"), ("discriminator", "L_D")):
        ax.plot(smooth([r[key] for r in history]), label=label)
    ax.set(title="stage B: rate and adversarial losses", xlabel="step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
