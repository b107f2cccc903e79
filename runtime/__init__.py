"""mrad-edge runtime: score images with an exported bundle. Never imports torch."""

from .detector import Detector, Result
from .errors import BundleError, ImageError, MradError, ProviderError

__all__ = ["Detector", "Result", "MradError", "BundleError", "ImageError", "ProviderError"]
