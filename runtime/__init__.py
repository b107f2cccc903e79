"""mrad-edge runtime: score images with an exported bundle. Never imports torch."""

from .detector import Detector, Result
from .errors import BundleError, ImageError, MradError, ProviderError, SourceError
from .overlay import overlay

__all__ = ["Detector", "Result", "overlay", "MradError", "BundleError", "ImageError", "ProviderError", "SourceError"]
