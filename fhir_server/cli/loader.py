"""``fhir-server load``: placeholder until the loader lands."""

import click


@click.command()
@click.argument("paths", nargs=-1)
def load_command(paths: tuple[str, ...]) -> None:
    """Load bundles."""
    raise click.ClickException("not implemented yet")
