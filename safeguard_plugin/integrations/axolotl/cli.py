"""``axolotl safeguard ...``: registered through Axolotl's ``axolotl.cli_commands`` entry-point group."""

from __future__ import annotations

import click


@click.group(name="safeguard")
def safeguard() -> None:
    """safeguard-plugin: safety constraints for fine-tuning."""


@safeguard.command("calibrate")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=str))
def calibrate(config: str) -> None:
    """Compute the artifact (safeguard.artifact) an Axolotl YAML needs, from the model it trains."""
    from .calibrate import calibrate_from_axolotl_config

    path = calibrate_from_axolotl_config(config)
    click.echo(f"safeguard artifact: {path.resolve()}")


@safeguard.command("check")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=str))
def check(config: str) -> None:
    """Validate an Axolotl YAML's `safeguard:` block (and that the plugin is active) without training."""
    from axolotl.cli.config import load_cfg

    from .plugin import _describe, safeguard_block

    sg = safeguard_block(load_cfg(config))
    if sg is None:
        raise click.ClickException(f"{config}: no `safeguard:` block")
    click.echo("safeguard block OK:\n" + "\n".join(_describe(sg)))
