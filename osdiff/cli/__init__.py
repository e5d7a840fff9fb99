"""The `osdiff` command line: one thin command per task, grouped by what it works on.

| file | commands |
|---|---|
| codec.py | compress, decompress, demo, profile |
| model.py | export, verify-reference, build, compare |
| calibrate.py | calibrate |
| train.py | train |
| evaluate.py | eval |
| serve.py | serve, triton-repo |

Each command parses its options and calls into the stage that does the work; common.py holds
what they share (error handling, the model and backend options, per-file runs).
"""

from __future__ import annotations

import click

from osdiff.cli import calibrate, codec, evaluate, model, serve, train
from osdiff.runtime.coder import CODERS, use_coder


@click.group()
@click.version_option(package_name="osdiff-engine")
@click.option("--coder", type=click.Choice(CODERS), default=None,
              help="rANS coder: native (the default) or compressai (CompressAI's own, the reference; slower). "
                   "Streams do not depend on it.")
def main(coder: str | None) -> None:
    """osdiff-engine: the OSDiff one-step diffusion image codec."""
    if coder:
        use_coder(coder)



for _module in (model, calibrate, codec, train, evaluate, serve):
    for _command in _module.COMMANDS:
        main.add_command(_command)
