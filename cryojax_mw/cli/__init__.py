"""The `cryojax-mw` command line (also `python -m cryojax_mw.cli`)."""

from . import _particles  # noqa: F401  (registers its sub-commands)
from ._commands import cli, main

__all__ = ["cli", "main"]
