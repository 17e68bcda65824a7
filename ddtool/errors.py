"""The one exception type of ddtool, and the exit codes the CLI turns it into.

Every error a user can cause (a missing file, a checkpoint that does not fit its architecture, a
folder with nothing to read, ...) is raised as a :class:`DDToolError` subclass. The CLI prints its
message as one line on stderr and exits with its ``exit_code``; the README's table of exit codes
is this file.
"""

from __future__ import annotations


class DDToolError(Exception):
    """An error the user can fix; ``str(err)`` is the one line shown to them."""

    exit_code = 1


class UsageError(DDToolError):
    """An option value that cannot work (a negative rate, a malformed shape, ...)."""

    exit_code = 2


class CheckpointError(DDToolError):
    """The checkpoint or its architecture could not be loaded."""

    exit_code = 3


class NoDropoutError(DDToolError):
    """The model has no active dropout, so there is nothing to distill."""

    exit_code = 4


class DataError(DDToolError):
    """The input folder holds nothing usable, or its contents do not fit the model."""

    exit_code = 5


class OutputError(DDToolError):
    """An output could not be written (it exists without --force, or the folder is unwritable)."""

    exit_code = 6


class ExportError(DDToolError):
    """An exported model failed its parity check against PyTorch; nothing was kept."""

    exit_code = 7


class ModelError(DDToolError):
    """The model failed when run on the inputs (wrong input shape, unsupported output)."""

    exit_code = 8


#: Exit code of a run stopped by SIGINT/SIGTERM (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): how a
    failure in torch or in user code is quoted in ddtool's one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
