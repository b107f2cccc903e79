"""mrad-edge runtime: score images with an exported bundle. Never imports torch.

``Detector`` scores with one bundle; ``Station`` owns a line's recipes (one per product) and switches between
them while running.
"""

from .core.detector import Detector
from .core.overlay import overlay
from .core.result import Result
from .errors import BundleError, ImageError, MradError, ProviderError, SourceError
from .line.station import Recipe, Station

__all__ = ["Detector", "Station", "Recipe", "Result", "overlay", "MradError", "BundleError", "ImageError",
           "ProviderError", "SourceError"]
