"""The recipe of the built-in demo model (osdiff/assets/demo_model.safetensors): one command,
`osdiff train --builtin -o DIR`, from a fixed seed.

No pretrained Stable Diffusion exists at the demo size, so this differs from the paper in
four places, all forced by that: (1) stage A trains the demo-sized VAE as an autoencoder
first (training/autoencoder.py), which stays frozen afterwards, as SD's VAE does in the
paper; (2) in stage B the demo-sized UNet is trained together with the LFGCM and the control
module (the paper keeps a pretrained SD UNet frozen), at a learning rate ten times the paper's
1e-4 (after a warm-up) until `decay_at`, then the paper's, because everything starts from
scratch and the budget is about an hour on 2 CPU cores; (3) the one denoising step is at t = 200, not 999
(ModelConfig.demo(): at t = 999 eq. 8 multiplies the UNet's error in cancelling y_T by 14.6,
which a UNet trained for an hour on a CPU cannot bring down); (4) y_T is pure noise in
training, as at inference (at t = 200 the paper's q(y0, t, n) would hand the UNet 87 % of y0,
which inference does not have). Stage B is otherwise the paper's objective
(training/objective.py). The demo UNet's width (64 channels, so that its GroupNorms keep each
channel's mean) is the config's: see ModelConfig.demo().

Stages write into DIR and are skipped when their output exists, so an interrupted run
continues where it stopped (stage B resumes from its last checkpoint):
    vae.pt            stage A: the autoencoder and its loss history
    vae_tuned.pt      stage A2: the same, fine-tuned on large crops
    osdiff.ckpt       stages B and B2: the training checkpoint (Lightning layout; `osdiff export` reads it)
    demo_model.safetensors   the shipped weights: inference keys only, float16
    results.json, loss_curves.png, held_out.jpg   held-out evaluation, the loss curves, the
                      held-out photos above their decodings
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
from osdiff.training.data import RandomCrops, builtin_training_images
from osdiff.training.loop import Trainer, TrainSettings, safe_cpu_convolutions
from osdiff.training.objective import OSDiffTraining


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    # the data (training/data.py builtin_training_images): photographs are this share of the
    # crops, the wallpaper packages' digital paintings the rest (they carry every hue but little
    # texture, and outnumber the photographs 33 to 10); half the crops colour-jittered
    photo_share: float = 0.6
    colour_jitter: bool = True
    # stage A: the autoencoder
    vae_steps: int = 5000
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    kl_weight: float = 3e-5
    # bfloat16 autocast where the CPU has native bfloat16 (AMX or AVX-512 BF16; about twice as
    # fast as float32 there); float32 elsewhere and on CUDA. Stage A only: stage B's rate needs
    # float32 likelihoods
    vae_bf16: bool = True
    # stage A2: the same autoencoder fine-tuned on large crops. Its GroupNorms normalize over
    # the whole input; trained on 64-px crops only, it reconstructed 64-px tiles of held-out
    # photos at 24.7 dB but whole photos at 17 dB, 20-48 grey levels too bright
    tune_steps: int = 600
    tune_batch: int = 2
    tune_crop: int = 256
    tune_lr: float = 3e-4
    # stage B: the OSDiff objective, one step at the demo config's t = 200 from pure noise
    steps: int = 2800
    batch: int = 2
    crop: int = 128  # large enough that the UNet's GroupNorms see whole-image statistics (see A2)
    lr: float = 1e-3
    warmup: int = 50
    decay_at: int = 2000  # then lr / 10: the one-step denoiser's precision needs the smaller steps
    rate_weight: float = 0.3  # lambda (the paper's 1 or 2; smaller spends more bits: up to 0.6 bpp)
    pure_noise: bool = True  # y_T = noise, as at inference (TrainSettings.pure_noise)
    # stage B2: stage B continued (at its decayed learning rate) on large crops, for the UNet's
    # GroupNorms as A2 for the VAE's: after stage B alone, the denoiser run in 128-px tiles beat
    # it run on the whole photo by 3 dB
    large_steps: int = 800
    large_crop: int = 256
    large_batch: int = 1


def train_builtin(out: str | Path, recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> Path:
    """Run (or continue) every stage; returns the path of the shipped-weights file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.demo()
    names, images, photo = builtin_training_images(log)
    data = TrainingData(names, images, _weights(photo, recipe.photo_share), recipe.colour_jitter)
    t0 = time.perf_counter()

    vae: dict | None = None  # stage A's state, then A2's
    for name, fields, what in (("vae.pt", _stage_a(recipe, names), f"stage A: autoencoder, {recipe.vae_steps} steps of "
                                f"{recipe.vae_batch} crops of {recipe.vae_crop}px"),
                               ("vae_tuned.pt", _stage_a(recipe, names, tuned=True), f"stage A2: the autoencoder on large "
                                f"crops, {recipe.tune_steps} steps of {recipe.tune_batch} crops of {recipe.tune_crop}px")):
        path = out / name
        if not path.exists():
            log(what)
            state = train_autoencoder(cfg, data, recipe, log, init=vae)
            state["recipe"] = fields
            buf = io.BytesIO()
            torch.save(state, buf)
            write_atomic(path, buf.getvalue())
        vae = torch.load(path, map_location="cpu", weights_only=True)
        if vae.get("recipe") != fields:
            raise ValueError(f"{path} was made by another recipe; use another output folder")

    ckpt = out / "osdiff.ckpt"
    settings = TrainSettings(steps=recipe.steps + recipe.large_steps, rate_weight=recipe.rate_weight, lr=recipe.lr,
                             d_lr=recipe.lr, warmup=recipe.warmup, decay_at=recipe.decay_at, seed=recipe.seed,
                             pure_noise=recipe.pure_noise)
    if ckpt.exists():
        trainer = Trainer.resume(ckpt, settings=settings)
        log(f"stage B: resuming at step {trainer.global_step}")
    else:
        assert vae is not None
        trainer = Trainer(initial_model(cfg, vae, recipe.seed), settings)
    # stage B, then B2 on large crops; after a resume, the batches the run would have drawn
    end = 0  # the step a stage ends at
    for what, steps, crop, batch, seed in (("B: OSDiff objective", recipe.steps, recipe.crop, recipe.batch, 1),
                                           ("B2: on large crops", recipe.large_steps, recipe.large_crop,
                                            recipe.large_batch, 4)):
        batches = data.crops(crop, batch, recipe.seed + seed)
        for _ in range(min(max(trainer.global_step - end, 0), steps)):
            next(batches)
        end += steps
        if trainer.global_step < end:
            log(f"stage {what}, {steps} steps of {batch} crops of {crop}px")
            trainer.train(batches, end, log=log, log_every=25, checkpoint=ckpt, checkpoint_every=100)
    wall, cpu = time.perf_counter() - t0, time.process_time()
    log(f"training done: {wall:.0f} s wall, {cpu:.0f} s CPU (this process, {torch.get_num_threads()} threads)")
    timing = out / "timing.json"
    runs = json.loads(timing.read_text())["runs"] if timing.exists() else []
    runs.append({"wall_s": round(wall), "cpu_s": round(cpu), "threads": torch.get_num_threads(),
                 "stage_b_steps": trainer.global_step})
    write_atomic(timing, json.dumps({"runs": runs}, indent=1).encode())

    weights = out / "demo_model.safetensors"
    write_weights(trainer.model, weights)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe) | {"training_images": names}, indent=1))
    return weights


@dataclass(frozen=True)
class TrainingData:
    names: list[str]
    images: list[np.ndarray]
    weights: list[float]
    colour: bool

    def crops(self, crop: int, batch: int, seed: int) -> RandomCrops:
        return RandomCrops(self.images, crop, batch, seed, self.weights, self.colour)


def _weights(photo: list[bool], photo_share: float) -> list[float]:
    """Per image: photographs share photo_share of the draws, the paintings the rest (all
    photographs when there are no paintings)."""
    n = sum(photo)
    if n == len(photo):
        return [1.0] * n
    return [photo_share / n if p else (1 - photo_share) / (len(photo) - n) for p in photo]


def _stage_a(recipe: Recipe, names: list[str], tuned: bool = False) -> dict:
    """The recipe fields (and training pictures) stage A (tuned: A and A2) depends on."""
    return {k: v for k, v in asdict(recipe).items()
            if k in ("seed", "photo_share", "colour_jitter")
            or k.startswith(("vae_", "kl_") + (("tune_",) if tuned else ()))} | {"training_images": names}


def _native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def train_autoencoder(cfg: ModelConfig, data: TrainingData, recipe: Recipe,
                      log: Callable[[str], None], init: dict | None = None) -> dict:
    """Stage A (init None): a seeded autoencoder trained on vae_steps batches of small crops.
    Stage A2 (init: stage A's state): that autoencoder fine-tuned on tune_steps batches of large
    crops. Each ends by rescaling the latent to unit variance. Returns the state and history."""
    from osdiff.export.models.vae import VAEDecoder, VAEEncoder

    torch.manual_seed(recipe.seed)
    enc, dec = VAEEncoder(cfg.vae, cfg.diffusion.scale_factor), VAEDecoder(cfg.vae, cfg.diffusion.scale_factor)
    if init is None:
        steps, batch, crop, lr, seed = recipe.vae_steps, recipe.vae_batch, recipe.vae_crop, recipe.vae_lr, recipe.seed
    else:
        enc.load_state_dict(init["vae_encoder"])
        dec.load_state_dict(init["vae_decoder"])
        steps, batch, crop, lr = recipe.tune_steps, recipe.tune_batch, recipe.tune_crop, recipe.tune_lr
        seed = recipe.seed + 3
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05, final_div_factor=20)
    batches = data.crops(crop, batch, seed)
    generator = torch.Generator().manual_seed(seed)
    bf16 = recipe.vae_bf16 and _native_bf16()
    log(f"  {'bfloat16 autocast' if bf16 else 'float32'}")
    history = []
    t0 = time.perf_counter()
    every = max(1, min(250, steps // 10))
    for step in range(1, steps + 1):
        with safe_cpu_convolutions():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                losses = vae_losses(enc, dec, next(batches), recipe.kl_weight, generator)
            losses = {k: v.float() for k, v in losses.items()}
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append({k: float(v.detach()) for k, v in losses.items()} | {"step": step})
        if step % every == 0 or step == steps:
            recent = history[-every:]
            rec = float(np.mean([r["rec"] for r in recent]))
            log(f"  vae step {step}/{steps} ({time.perf_counter() - t0:.0f} s): rec {rec:.5f} "
                f"({-10 * np.log10(rec):.2f} dB), kl {np.mean([r['kl'] for r in recent]):.3f}")
    sample = next(RandomCrops(data.images, 128, 16, recipe.seed + 2, data.weights))
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
    """Evaluate DIR/demo_model.safetensors (as shipped: float16, through the normal loader) with
    real streams on the held-out set (training/data.py HELD_OUT_SET; without the wallpaper photos
    when they were not fetched, which it says), the bundled demo photo beside it, next to JPEG
    and WebP at the same bpp; LPIPS and DISTS where their backbone weights are on this machine.
    Writes results.json, loss_curves.png and held_out.jpg (originals above, decoded below) into
    DIR, and copies into results_dir as demo_model_training.json, demo_model_loss_curves.png,
    demo_model_held_out.jpg."""
    from importlib import resources

    from safetensors.torch import load_file

    from osdiff.export.model import OSDiffModel
    from osdiff.files import read_image
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec
    from osdiff.training import wallpapers
    from osdiff.training.data import HELD_OUT_PHOTOS, HELD_OUT_SET, held_out_photo
    from osdiff.training.evaluate import evaluate, means, table

    out = Path(out)
    weights = out / "demo_model.safetensors"
    cfg = ModelConfig.demo()
    model = OSDiffModel.load(None, weights, cfg)
    training_model = OSDiffTraining(cfg)
    training_model.load_checkpoint_state_dict(load_file(str(weights)))
    names = [n for n in HELD_OUT_SET if n not in wallpapers.BY_NAME or wallpapers.available()]
    if len(names) < len(HELD_OUT_SET):
        log(f"held-out set without its wallpaper photographs: {wallpapers.missing_message()}")
    images = {n: held_out_photo(n) for n in names}
    with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as demo:
        images["demo.png"] = read_image(demo)
    perceptual, skipped = _perceptual_metrics()
    decoded: dict[str, np.ndarray] = {}
    rows = evaluate(Codec(TorchBackend(model)), training_model, images, perceptual, decoded)
    log(table(rows))
    held = [r for r in rows if r.name in HELD_OUT_SET]
    ckpt = torch.load(out / "osdiff.ckpt", map_location="cpu", weights_only=True)
    vae_history = [r for name in ("vae.pt", "vae_tuned.pt")
                   for r in torch.load(out / name, map_location="cpu", weights_only=True)["history"]]
    results = {
        "weights": weights.name,
        "sha256": __import__("hashlib").sha256(weights.read_bytes()).hexdigest(),
        "bytes": weights.stat().st_size,
        "recipe": json.loads((out / "recipe.json").read_text()),
        "held_out": [r.to_dict() for r in held],
        "held_out_set_complete": len(names) == len(HELD_OUT_SET),
        "mean": means(held),
        "trio_mean": means([r for r in held if r.name in HELD_OUT_PHOTOS]),
        "demo": next(r.to_dict() for r in rows if r.name == "demo.png"),
        "perceptual_skipped": skipped,
    }
    timing = out / "timing.json"
    if timing.exists():
        results["timing"] = json.loads(timing.read_text())
    plot_loss_curves(vae_history, ckpt["osdiff_training"]["history"], out / "loss_curves.png")
    plot_held_out({n: (images[n], decoded[n]) for n in names}, out / "held_out.jpg")
    write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(results_dir / "demo_model_training.json", json.dumps(results, indent=1).encode())
        for name in ("loss_curves.png", "held_out.jpg"):
            write_atomic(results_dir / f"demo_model_{name}", (out / name).read_bytes())
    return results


def _perceptual_metrics() -> tuple[Callable[[np.ndarray, np.ndarray], dict[str, float]] | None, dict[str, str]]:
    """LPIPS and DISTS (evaluation/metrics.py) where their backbone weights are on this machine:
    (a function of original and decoded image, or None; the reason per metric that cannot run)."""
    try:
        from osdiff.evaluation.metrics import ImageMetrics

        metrics = ImageMetrics()
    except ImportError as e:
        return None, {"lpips-alex": str(e), "lpips-vgg": str(e), "dists": str(e)}
    keys = [k for k in ("lpips-alex", "lpips-vgg", "dists") if k not in metrics.skipped]
    if not keys:
        return None, dict(metrics.skipped)
    return (lambda a, b: {k: v for k, v in metrics(a, b).items() if k in keys}), dict(metrics.skipped)


def plot_held_out(pairs: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, height: int = 160) -> None:
    """A contact sheet: each held-out photo (scaled to `height` pixels) above its decoding."""
    from PIL import Image, ImageDraw

    cells = []
    for name, (a, b) in pairs.items():
        w = round(a.shape[1] * height / a.shape[0])
        cell = Image.new("RGB", (w, 2 * height + 14), "white")
        for i, im in enumerate((a, b)):
            cell.paste(Image.fromarray(im).resize((w, height), Image.LANCZOS), (0, i * height))
        ImageDraw.Draw(cell).text((2, 2 * height + 1), name, fill="black")
        cells.append(cell)
    rows = [cells[i:i + 4] for i in range(0, len(cells), 4)]
    width = max(sum(c.width for c in r) + 4 * (len(r) - 1) for r in rows)
    sheet = Image.new("RGB", (width, len(rows) * (2 * height + 18)), "white")
    for j, r in enumerate(rows):
        x = 0
        for c in r:
            sheet.paste(c, (x, j * (2 * height + 18)))
            x += c.width + 4
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)  # a picture for people; JPEG keeps the repository small
    write_atomic(path, buf.getvalue())


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
    ax.set(title="stages A and A2: autoencoder", xlabel="step", ylabel="reconstruction PSNR of training crops (dB)")
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
