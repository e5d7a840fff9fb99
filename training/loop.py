"""The training loop of the OSDiff objective: three optimizers, one step of each per batch,
checkpoints in the layout the loader reads, and resuming from them.

Per batch (the original OSDiff.training_step): the generator turn (L, eq. 12-13; gradient
norm clipped to 1), the auxiliary turn (the z density's quantiles), the discriminator turn
(L_D, eq. 14; clipped to 1). AdamW, lr 1e-4, betas (0.9, 0.999) for the generator and the
discriminator, 1e-3 for the quantiles; bitsandbytes' 8-bit AdamW where the model is on CUDA
and bitsandbytes is installed, as the original.

A checkpoint is a Lightning-style dict: `state_dict` (the OSDiff + SD keys of
OSDiffTraining.checkpoint_state_dict, so `osdiff export --osdiff ckpt` takes it as it is),
`global_step`, `optimizer_states` and `osdiff_training` (config, settings, random states, loss
history). It holds tensors and plain data only, as the loader requires.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from osdiff.config import ModelConfig
from osdiff.export.checkpoint import CheckpointError
from osdiff.files import write_atomic
from osdiff.training.objective import OSDiffTraining


@contextmanager
def safe_cpu_convolutions() -> Iterator[None]:
    """Training steps run inside this. With one CPU thread, oneDNN's convolution backward
    (weights) in torch 2.13 writes past a buffer it frees: glibc aborts with "free(): invalid
    next size" in ideep::convolution_backward_weights, or the heap is corrupted and a later
    allocation crashes. A train step under torch.set_num_threads(1) did so every time here
    (2 CPU cores, AVX2); with two threads it did not. So with one thread the step uses ATen's
    own convolutions instead; just as fast on the tiny model."""
    if torch.get_num_threads() > 1 or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


@dataclass
class TrainSettings:
    steps: int = 1000
    rate_weight: float = 1.0  # lambda of eq. 12 (the paper trains with 1 and 2)
    lr: float = 1e-4
    aux_lr: float = 1e-3
    d_lr: float = 1e-4
    warmup: int = 0  # steps of linear warm-up
    decay_at: int = 0  # from this step on (if > 0) the learning rates are multiplied by `decay`
    decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    # y_T = pure noise, as at inference, instead of the paper's q(y0, t, n): at the paper's
    # t = 999 the two hardly differ (sqrt(abar) = 0.07); at a smaller t only pure noise keeps
    # training and inference alike
    pure_noise: bool = False


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]

            return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999))
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999))


class Trainer:
    """Holds the model, its optimizers and the step count; `step(x)` runs one batch."""

    def __init__(self, model: OSDiffTraining, settings: TrainSettings, device: str | torch.device = "cpu"):
        self.model, self.settings = model, settings
        self.device = torch.device(device)
        model.to(self.device)
        model.set_requires_grad()
        self.opt_g = make_optimizer(model.generator_parameters(), settings.lr, self.device)
        self.opt_aux = torch.optim.AdamW(model.aux_parameters(), lr=settings.aux_lr, betas=(0.9, 0.999))
        self.opt_d = make_optimizer(model.discriminator_parameters(), settings.d_lr, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.global_step = 0
        self.history: list[dict[str, float]] = []

    def lr_factor(self) -> float:
        """Linear warm-up, then constant (the paper's), then one step down at decay_at. The
        factor of a step never depends on the total number of steps, so a run stopped at step
        n is exactly a run of n steps."""
        s, i = self.settings, self.global_step
        if i < s.warmup:
            return (i + 1) / s.warmup
        return s.decay if 0 < s.decay_at <= i else 1.0

    def step(self, x: Tensor) -> dict[str, float]:
        with safe_cpu_convolutions():
            return self._step(x)

    def _step(self, x: Tensor) -> dict[str, float]:
        m, s = self.model, self.settings
        f = self.lr_factor()
        for opt, lr in ((self.opt_g, s.lr), (self.opt_d, s.d_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * f
        x = x.to(self.device)
        m.train()

        # generator turn: the discriminator's parameters take no gradient
        m.guidance_model.requires_grad_(False)
        out = m.generator_step(x, s.rate_weight, self.generator, pure_noise=s.pure_noise)
        if not torch.isfinite(out.losses["total"]):
            bad = [k for k, v in out.losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"step {self.global_step + 1}: the loss is not finite ({', '.join(bad)})")
        out.losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(m.generator_parameters(), s.clip)
        self.opt_g.step()
        self._zero_all()
        m.guidance_model.requires_grad_(True)

        # auxiliary turn: the quantiles of the z density
        aux = m.prior.aux_loss()
        aux.backward()
        self.opt_aux.step()
        self._zero_all()

        # discriminator turn, on this batch's y_r
        d_loss = m.discriminator_step(out.y_r, out.y0, self.generator)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(m.discriminator_parameters(), s.clip)
        self.opt_d.step()
        self._zero_all()

        self.global_step += 1
        record = {k: float(v.detach()) for k, v in out.losses.items()}
        record.update(discriminator=float(d_loss.detach()), aux=float(aux.detach()), step=self.global_step)
        self.history.append(record)
        return record

    def _zero_all(self) -> None:
        for opt in (self.opt_g, self.opt_aux, self.opt_d):
            opt.zero_grad(set_to_none=True)

    def train(self, batches: Iterator[Tensor], steps: int, log: Callable[[str], None] = print,
              log_every: int = 50, checkpoint: Path | None = None, checkpoint_every: int = 0) -> None:
        """Run until global_step reaches `steps`, logging averages every log_every steps."""
        t0 = time.perf_counter()
        while self.global_step < steps:
            self.step(next(batches))
            if self.global_step % log_every == 0 or self.global_step == steps:
                recent = self.history[-log_every:]
                avg = {k: float(np.mean([r[k] for r in recent])) for k in recent[0] if k != "step"}
                log(f"step {self.global_step}/{steps} ({time.perf_counter() - t0:.0f} s): "
                    + ", ".join(f"{k} {v:.4g}" for k, v in avg.items()))
            if checkpoint is not None and checkpoint_every and self.global_step % checkpoint_every == 0:
                self.save(checkpoint)
        if checkpoint is not None:
            self.save(checkpoint)

    # --- checkpoints ----------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write a checkpoint (atomically: a temporary name, then a rename)."""
        import io

        state = {
            "state_dict": self.model.checkpoint_state_dict(),
            "global_step": self.global_step,
            "epoch": 0,
            "optimizer_states": [self.opt_g.state_dict(), self.opt_aux.state_dict(), self.opt_d.state_dict()],
            "osdiff_training": {
                "config": self.model.config.to_dict(),
                "train_unet": self.model.train_unet,
                "settings": asdict(self.settings),
                "generator_state": self.generator.get_state(),
                "history": self.history,
                **(extra or {}),
            },
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(Path(path), buf.getvalue())

    @staticmethod
    def resume(path: str | Path, device: str | torch.device = "cpu",
               settings: TrainSettings | None = None) -> "Trainer":
        """A trainer in the state `save` left: weights, optimizers, step, random state, history.
        `settings` may override the saved ones (e.g. more steps)."""
        ckpt = read_training_checkpoint(path)
        info = ckpt["osdiff_training"]
        cfg = ModelConfig.from_dict(info["config"])
        model = OSDiffTraining(cfg, train_unet=bool(info["train_unet"]))
        model.load_checkpoint_state_dict(ckpt["state_dict"])
        trainer = Trainer(model, settings or TrainSettings(**info["settings"]), device)
        for opt, state in zip((trainer.opt_g, trainer.opt_aux, trainer.opt_d), ckpt["optimizer_states"]):
            opt.load_state_dict(state)
        trainer.global_step = int(ckpt["global_step"])
        trainer.generator.set_state(info["generator_state"])
        trainer.history = list(info["history"])
        return trainer


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by Trainer.save, read without running code from the file."""
    from osdiff.export.checkpoint import _torch_load

    obj = _torch_load(Path(path))
    if not isinstance(obj, dict) or not isinstance(obj.get("osdiff_training"), dict) or "state_dict" not in obj:
        raise CheckpointError(f"{path}: not an osdiff training checkpoint (no training state to resume from)")
    return obj
