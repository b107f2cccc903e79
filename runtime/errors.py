"""The one exception family users see.

Every message says what happened and what to do about it, so that command
lines can print it without a traceback.
"""


class MradError(Exception):
    """Base of every error raised for a user's mistake or a bad input."""


class BundleError(MradError):
    """A bundle is missing, corrupt, foreign or of an unsupported version."""


class ImageError(MradError):
    """An image could not be read or decoded."""


class ProviderError(MradError):
    """A requested ONNX Runtime execution provider is not available."""


class SourceError(MradError):
    """A frame source cannot deliver frames at all (a camera never opens or stays lost)."""
