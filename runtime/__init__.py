"""mrad-edge runtime: score images with an exported bundle. Never imports torch."""

from .detector import Detector
from .errors import BundleError, ImageError, MradError, ProviderError, SourceError
from .overlay import overlay
from .result import Result

__all__ = ["Detector", "Result", "overlay", "MradError", "BundleError", "ImageError", "ProviderError", "SourceError"]
