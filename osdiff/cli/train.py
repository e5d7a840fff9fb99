"""The training command: the OSDiff objective, and the built-in model's recipe."""

from __future__ import annotations

from pathlib import Path

import click

from osdiff.cli.common import existing_file, user_errors
from osdiff.config import ModelConfig

@click.command(short_help="Train the LFGCM and control module with the OSDiff objective (paper eqs. 9-14).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The training checkpoint to write (with --builtin: a folder for every stage's output).")
@click.option("--builtin", is_flag=True, help="Reproduce the built-in demo model from its fixed recipe and seed "
                                              "(training/builtin.py; photographs scikit-image and matplotlib ship, "
                                              "and Debian's wallpapers: `make photos`). Uses only -o, --threads "
                                              "and --results (whose files it overwrites).")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Folder of training images.")
@click.option("--resume", type=existing_file, help="Continue from a checkpoint that `osdiff train` wrote.")
@click.option("--sd", type=existing_file, help="SD 2.1 checkpoint to start from (the OSDiff parts start untrained).")
@click.option("--osdiff", "osdiff_ckpt", type=existing_file, help="OSDiff checkpoint to start from (with --sd, or combined).")
@click.option("--config", default=None, help='Model config: "full" (default), "demo", or a JSON file.')
@click.option("--steps", default=100_000, show_default=True, help="Train until this global step.")
@click.option("--batch", default=4, show_default=True)
@click.option("--crop", default=512, show_default=True, help="Side of the random training crops, pixels.")
@click.option("--lambda", "rate_weight", default=1.0, show_default=True, help="Weight of the rate (the paper: 1 or 2).")
@click.option("--lr", default=1e-4, show_default=True, help="AdamW learning rate (generator and discriminator).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, ...).")
@click.option("--checkpoint-every", default=1000, show_default=True, help="Steps between checkpoints.")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--results", default=None, type=click.Path(file_okay=False),
              help="With --builtin: also copy the evaluation and loss curves here (e.g. benchmarks/results).")
@user_errors
def train(output: str, builtin: bool, images: str | None, resume: str | None, sd: str | None, osdiff_ckpt: str | None,
          config: str | None, steps: int, batch: int, crop: int, rate_weight: float, lr: float, seed: int, device: str,
          checkpoint_every: int, threads: int | None, results: str | None) -> None:
    """Train with the OSDiff objective (paper eqs. 9-14): the LFGCM, the control module and the
    latent discriminator, the SD VAE and UNet frozen. Writes checkpoints that `osdiff export
    --osdiff` reads unchanged, and resumes from them."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if builtin:
        from osdiff.training.builtin import report_builtin, train_builtin

        train_builtin(output, log=click.echo)
        report_builtin(output, results, log=click.echo)
        return

    from osdiff.export.checkpoint import read_checkpoints, read_state_dict
    from osdiff.training.data import RandomCrops, folder_images
    from osdiff.training.loop import Trainer, TrainSettings
    from osdiff.training.objective import OSDiffTraining

    if images is None:
        raise click.UsageError("give --images FOLDER (or --builtin)")
    settings = TrainSettings(steps=steps, rate_weight=rate_weight, lr=lr, d_lr=lr, seed=seed)
    if resume:
        if sd or osdiff_ckpt:
            raise click.UsageError("--resume takes no other checkpoint")
        trainer = Trainer.resume(resume, device, settings)
        click.echo(f"resuming at step {trainer.global_step}")
    else:
        model = OSDiffTraining(ModelConfig.named(config))
        if osdiff_ckpt:
            model.load_checkpoint_state_dict(read_checkpoints(sd, osdiff_ckpt))
        elif sd:
            model.load_sd(read_state_dict(sd))
        else:
            raise click.UsageError("give --sd (and --osdiff), or --resume")
        trainer = Trainer(model, settings, device)
    batches = RandomCrops(folder_images(images), crop, batch, seed)
    for _ in range(trainer.global_step):  # the batches an uninterrupted run would see next
        next(batches)
    trainer.train(batches, steps, log=click.echo, checkpoint=Path(output), checkpoint_every=checkpoint_every)
    click.echo(f"wrote {output} at step {trainer.global_step}")


COMMANDS = [train]
