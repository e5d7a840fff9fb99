"""The `osdiff` command line."""

import click


@click.group()
def main() -> None:
    """osdiff-engine: OSDiff one-step diffusion image codec."""


if __name__ == "__main__":
    main()
