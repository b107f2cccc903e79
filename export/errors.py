"""Errors of the export stage share the runtime's user-facing family."""

from mrad.runtime.errors import MradError


class ExportError(MradError):
    """The export could not proceed: bad arguments, bad data or unsupported model."""
