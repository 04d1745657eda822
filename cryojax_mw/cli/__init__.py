"""The `cryojax-mw` command line (also `python -m cryojax_mw.cli`)."""

from ._commands import cli, main

__all__ = ["cli", "main"]
