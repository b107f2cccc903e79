"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis: frames with the camera's own ids and timestamps.

Why Aravis: an LGPL library kept since 2009 that speaks GigE Vision and USB3
Vision itself, packaged by Debian and Ubuntu (gir1.2-aravis-0.8) and reached
from Python through GObject introspection (PyGObject), and it ships a
simulated GigE Vision camera (arv-fake-gv-camera-0.8) to test against.
Harvesters, the other common choice, needs a GenTL producer (a vendor's .cti
file), which neither Debian nor PyPI provides.

Only :func:`to_rgb` and the tables work without Aravis; opening a camera
imports it then, and says what to install when it is missing.
"""

from __future__ import annotations

import difflib
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np

from .. import defaults
from ..errors import ImageError, MradError, SourceError
from .records import event_record, now
from .sources import Frame, Reconnecting

INSTALL = ('GenICam cameras need Aravis and its Python binding: apt-get install gir1.2-aravis-0.8 '
           'libgirepository1.0-dev libcairo2-dev pkg-config (Debian/Ubuntu; libgirepository and cairo are for '
           'building PyGObject), then pip install "mrad-edge[line]"')
TRIGGERS = ("off", "software", "hardware")
# Without a hardware trigger a frame is due within this many seconds; longer, and the camera counts as lost.
# (Under a hardware trigger only the lost control channel tells: the line may rightly stay quiet for hours.)
FRAME_TIMEOUT_S = 5.0
# Buffers the stream cycles through: a few frames of slack while one is converted.
STREAM_BUFFERS = 8
# How often a wait for a frame looks at a stop request and the control channel.
_POLL_US = 100_000
# Aravis keeps one device list for the process: cameras read at once, each in its thread, take turns to update it.
_DISCOVERY = threading.Lock()

# Pixel formats read, by PFNC code (GenICam's Pixel Format Naming Convention): name, layout, bits per sample.
# Samples over 8 bits come in 16-bit little-endian words, scaled to 8 bits over the format's range. Refused:
# packed formats (Mono12Packed, Mono10p, BayerRG12p, ...), YUV/YCbCr, planar, signed, 3D and RGB over 8 bits.
_LAYOUTS = {"mono": 1, "RGGB": 1, "GRBG": 1, "GBRG": 1, "BGGR": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}
PIXEL_FORMATS = {
    0x01080001: ("Mono8", "mono", 8), 0x01100003: ("Mono10", "mono", 10), 0x01100005: ("Mono12", "mono", 12),
    0x01100025: ("Mono14", "mono", 14), 0x01100007: ("Mono16", "mono", 16),
    0x01080009: ("BayerRG8", "RGGB", 8), 0x0110000D: ("BayerRG10", "RGGB", 10),
    0x01100011: ("BayerRG12", "RGGB", 12), 0x0110002F: ("BayerRG16", "RGGB", 16),
    0x01080008: ("BayerGR8", "GRBG", 8), 0x0110000C: ("BayerGR10", "GRBG", 10),
    0x01100010: ("BayerGR12", "GRBG", 12), 0x0110002E: ("BayerGR16", "GRBG", 16),
    0x0108000A: ("BayerGB8", "GBRG", 8), 0x0110000E: ("BayerGB10", "GBRG", 10),
    0x01100012: ("BayerGB12", "GBRG", 12), 0x01100030: ("BayerGB16", "GBRG", 16),
    0x0108000B: ("BayerBG8", "BGGR", 8), 0x0110000F: ("BayerBG10", "BGGR", 10),
    0x01100013: ("BayerBG12", "BGGR", 12), 0x01100031: ("BayerBG16", "BGGR", 16),
    0x02180014: ("RGB8", "rgb", 8), 0x02180015: ("BGR8", "bgr", 8),
    0x02200016: ("RGBa8", "rgba", 8), 0x02200017: ("BGRa8", "bgra", 8),
}
SUPPORTED = [name for name, _, _ in PIXEL_FORMATS.values()]


def to_rgb(data: bytes, width: int, height: int, pixel_format: int, x_padding: int = 0) -> np.ndarray:
    """A camera's image buffer as HxWx3 uint8 RGB.

    ``x_padding``: bytes after each row. Bayer mosaics are demosaiced
    bilinearly (OpenCV). An :class:`ImageError` for a format not read or a
    buffer too short for its size.
    """
    import cv2

    if pixel_format not in PIXEL_FORMATS:
        raise ImageError(f"pixel format 0x{pixel_format:08x} is not read; supported: {', '.join(SUPPORTED)}")
    name, layout, bits = PIXEL_FORMATS[pixel_format]
    channels, sample_bytes = _LAYOUTS[layout], 1 if bits == 8 else 2
    row = width * channels * sample_bytes
    if len(data) < (row + x_padding) * height:
        raise ImageError(f"{name} buffer of {len(data)} bytes is too short for {width} x {height}")
    rows = np.frombuffer(data, np.uint8, (row + x_padding) * height).reshape(height, row + x_padding)[:, :row]
    samples = _to_8_bits(rows.view("<u2"), bits) if sample_bytes == 2 else rows
    samples = np.ascontiguousarray(samples).reshape(height, width, channels)
    if layout == "rgb":
        return samples.copy()  # the buffer goes back to the camera; the frame keeps its own pixels
    conversion = {"mono": cv2.COLOR_GRAY2RGB, "bgr": cv2.COLOR_BGR2RGB, "rgba": cv2.COLOR_RGBA2RGB,
                  "bgra": cv2.COLOR_BGRA2RGB}.get(layout) or getattr(cv2, f"COLOR_Bayer{layout}2RGB")
    return cv2.cvtColor(samples, conversion)


def _to_8_bits(samples: np.ndarray, bits: int) -> np.ndarray:
    """``value * 255 / (2**bits - 1)``, rounded; stray high bits saturate instead of wrapping.

    OpenCV's scaling (float32, SIMD) is 15 times NumPy's here, and equal to np.rint for all 65,536 values of
    every depth read: no value lands near enough to a half for float32 to round it the other way.
    """
    import cv2

    return cv2.convertScaleAbs(samples, alpha=255.0 / (2 ** bits - 1))


def parse_settings(settings: list[str] | tuple[str, ...]) -> list[tuple[str, str | None]]:
    """``NAME=VALUE`` pairs in order (a bare ``NAME`` runs a command feature, UserSetLoad say)."""
    parsed = []
    for item in settings:
        name, sep, value = item.partition("=")
        if not name.strip() or (sep and not value.strip()):
            raise MradError(f"--genicam-set takes NAME=VALUE (ExposureTime=5000) or a command's NAME, got {item!r}")
        parsed.append((name.strip(), value.strip() if sep else None))
    return parsed


def parse_value(kind: str, name: str, text: str, choices: list[str] | None = None):
    """A feature's value from text, typed by its node: int, float, bool or an enumeration entry."""
    try:
        if kind == "int":
            return int(text, 0)
        if kind == "float":
            return float(text)
    except ValueError:
        raise MradError(f"feature {name} takes {'an integer' if kind == 'int' else 'a number'}, got {text!r}") from None
    if kind == "bool":
        truth = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}.get(text.lower())
        if truth is None:
            raise MradError(f"feature {name} takes true or false, got {text!r}")
        return truth
    if kind == "enum" and text not in choices:
        raise MradError(f"feature {name} takes one of {', '.join(choices)}, got {text!r}")
    return text


def import_aravis():
    """Aravis and GLib from GObject introspection; a MradError naming what to install when missing."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as exc:  # ValueError: gi is there, Aravis's typelib is not
        raise MradError(f"{INSTALL} ({exc})") from None
    return Aravis, GLib


class GenICamCamera(Reconnecting):
    """A GenICam camera by device id, serial number, MAC or IP address, as Aravis lists it.

    ``settings``: ``NAME=VALUE`` features set at every opening, in order,
    after the trigger (so TriggerSource or TriggerActivation can refine it).
    ``trigger``: "off" (free run), "software" (one trigger per frame read: the
    camera makes exactly the frames asked for) or "hardware" (the first Line
    the camera lists, or ``TriggerSource`` from the settings). Frames carry
    ``camera``: the camera's frame id and timestamp (ns). A camera that stops
    delivering (control channel lost, or no frame for ``frame_timeout``
    seconds when not hardware-triggered) is reopened as :class:`Reconnecting`
    says; the first opening is reported as a "camera_opened" event with the
    features read back.
    """

    def __init__(self, spec: str, settings=(), trigger: str = "off", reconnect_timeout: float = defaults.RECONNECT_TIMEOUT_S,
                 events: Callable[[dict], None] = lambda e: None, stop=None, frame_timeout: float = FRAME_TIMEOUT_S,
                 sleep: Callable[..., bool] | None = None, first_backoff: float = 0.5, max_backoff: float = 8.0):
        super().__init__(spec, reconnect_timeout, events, sleep, first_backoff, max_backoff, stop)
        if trigger not in TRIGGERS:
            raise MradError(f"--genicam-trigger takes one of {', '.join(TRIGGERS)}, got {trigger!r}")
        self.settings, self.trigger = parse_settings(settings), trigger
        self.frame_timeout = None if trigger == "hardware" else frame_timeout
        self.aravis, self.glib = import_aravis()

    def frames(self) -> Iterator[Frame]:
        connection = self._take_opened()
        self.events(event_record("camera_opened", source=self.spec, **connection.description))
        index = 0
        try:
            while True:
                buffer = connection.next_buffer(self.trigger == "software", self.frame_timeout, self.stop)
                if buffer is not None:
                    yield self._frame(connection, buffer, index)
                    index += 1
                    continue
                if self.stop:
                    return
                # A camera that is gone answers nothing: letting go of it waits out register timeouts (12 s
                # measured), so a thread does that while reconnecting begins.
                threading.Thread(target=connection.close, name="mrad-genicam-close", daemon=True).start()
                connection = None  # the thread has it: if reconnecting fails, there is nothing left to close here
                connection = self._reopen(self._try_connect)
                if connection is None:  # a stop was requested while waiting
                    return
        finally:
            if connection is not None:
                connection.close()

    def _frame(self, connection: _Connection, buffer, index: int) -> Frame:
        Aravis = self.aravis
        stamp = {"frame_id": buffer.get_frame_id(), "timestamp_ns": buffer.get_timestamp()}
        arrived = buffer.get_system_timestamp()  # host time the buffer completed, ns
        timestamp = (datetime.fromtimestamp(arrived / 1e9, timezone.utc).isoformat(timespec="milliseconds")
                     if arrived else now())
        try:
            status = buffer.get_status()
            if status != Aravis.BufferStatus.SUCCESS:
                return Frame(self.spec, index, timestamp, camera=stamp,
                             error=f"incomplete frame from the camera: {status.value_nick}")
            if buffer.get_payload_type() not in connection.image_payloads:
                return Frame(self.spec, index, timestamp, camera=stamp,
                             error=f"the camera sent no image (payload {buffer.get_payload_type().value_nick})")
            image = to_rgb(buffer.get_data(), buffer.get_image_width(), buffer.get_image_height(),
                           buffer.get_image_pixel_format(), buffer.get_image_padding()[0])
            return Frame(self.spec, index, timestamp, image=image, camera=stamp)
        except ImageError as exc:
            return Frame(self.spec, index, timestamp, camera=stamp, error=str(exc))
        finally:
            connection.stream.push_buffer(buffer)  # its pixels are copied: back to the camera

    def _connect(self) -> _Connection | None:
        """The camera opened, set up and acquiring; None when it is not on the network. Bad settings raise."""
        device_id = self._device_id()
        return None if device_id is None else _Connection(self, device_id)

    def _first_open(self) -> _Connection:
        connection = self._connect()
        if connection is None:
            raise SourceError(f"GenICam camera {self.spec!r} not found; cameras seen: {self._seen() or 'none'}")
        return connection

    def _try_connect(self) -> _Connection | None:
        """As _connect, for a camera coming back: any failure only means not back yet."""
        try:
            return self._connect()
        except (MradError, self.glib.Error):
            return None

    def _device_id(self) -> str | None:
        Aravis = self.aravis
        with _DISCOVERY:
            Aravis.update_device_list()  # discovery: a camera opened without it was seen to deliver no frames
            for i in range(Aravis.get_n_devices()):
                names = (Aravis.get_device_id(i), Aravis.get_device_serial_nbr(i), Aravis.get_device_physical_id(i),
                         Aravis.get_device_address(i))
                if self.spec in names:
                    return names[0]
        return None

    def _seen(self) -> str:
        Aravis = self.aravis
        with _DISCOVERY:
            return ", ".join(f"{Aravis.get_device_id(i)} (serial {Aravis.get_device_serial_nbr(i)})"
                             for i in range(Aravis.get_n_devices()))


class _Connection:
    """One opening of a camera: trigger and features set, a stream of buffers, acquisition running."""

    def __init__(self, source: GenICamCamera, device_id: str):
        self.aravis, self.glib = Aravis, GLib = source.aravis, source.glib
        self.lost = threading.Event()
        self.stream = None
        self.image_payloads = {Aravis.BufferPayloadType.IMAGE, Aravis.BufferPayloadType.CHUNK_DATA,
                               Aravis.BufferPayloadType.EXTENDED_CHUNK_DATA}
        try:
            self.camera = Aravis.Camera.new(device_id)
            self.device = self.camera.get_device()
            # Emitted from Aravis's heartbeat thread when the camera stops answering on its control channel.
            self.device.connect("control-lost", lambda _device: self.lost.set())
            self._set_trigger(source.trigger, source.settings)
            features = {name: self._set(name, value) for name, value in source.settings}
            if self.camera.get_pixel_format() not in PIXEL_FORMATS:
                offered = [f for f in self.camera.dup_available_pixel_formats_as_strings() if f in SUPPORTED]
                raise MradError(f"camera {source.spec!r} sends {self.camera.get_pixel_format_as_string()}, which is "
                                f"not read (supported: {', '.join(SUPPORTED)}); choose one it offers with "
                                f"--genicam-set PixelFormat={offered[0] if offered else 'Mono8'}")
            self.stream = self.camera.create_stream(None, None)
            payload = self.camera.get_payload()  # after the features: Width or PixelFormat change it
            for _ in range(STREAM_BUFFERS):
                self.stream.push_buffer(Aravis.Buffer.new_allocate(payload))
            self.camera.start_acquisition()
            _, _, width, height = self.camera.get_region()
            self.description = {"device_id": device_id, "model": self.camera.get_model_name(),
                                "serial": self.camera.get_device_serial_number(),
                                "pixel_format": self.camera.get_pixel_format_as_string(), "width": width,
                                "height": height, "trigger": source.trigger, "features": features}
        except GLib.Error as exc:
            self.close()
            raise MradError(f"GenICam camera {source.spec!r} could not be set up: {exc.message}") from None
        except MradError:
            self.close()
            raise

    def _set_trigger(self, trigger: str, settings: list[tuple[str, str | None]]) -> None:
        if trigger == "off":
            self.camera.clear_triggers()
        elif trigger == "software":
            self.camera.set_trigger("Software")
        else:
            lines = [s for s in self.camera.dup_available_trigger_sources() if s.startswith("Line")]
            line = dict(settings).get("TriggerSource") or (lines[0] if lines else None)
            if line is None:
                raise MradError("the camera lists no trigger line; name one with --genicam-set TriggerSource=...")
            self.camera.set_trigger(line)

    def _set(self, name: str, text: str | None):
        """Set one feature, typed by its node, and return the value the camera reads back."""
        Aravis, device = self.aravis, self.device
        node = device.get_feature(name)
        if node is None:
            close = difflib.get_close_matches(name, self._feature_names(), n=3, cutoff=0.5)
            raise MradError(f"the camera has no feature {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                      else ""))
        typed = [(Aravis.GcEnumeration, "enum", device.set_string_feature_value, device.get_string_feature_value),
                 (Aravis.GcBoolean, "bool", device.set_boolean_feature_value, device.get_boolean_feature_value),
                 (Aravis.GcInteger, "int", device.set_integer_feature_value, device.get_integer_feature_value),
                 (Aravis.GcFloat, "float", device.set_float_feature_value, device.get_float_feature_value),
                 (Aravis.GcString, "str", device.set_string_feature_value, device.get_string_feature_value)]
        try:
            if isinstance(node, Aravis.GcCommand):
                device.execute_command(name)
                return None
            if text is None:
                raise MradError(f"feature {name} is not a command: give it a value, {name}=VALUE")
            # An enumeration is an integer node too, so it is looked at first.
            for kind_of, kind, setter, getter in typed:
                if isinstance(node, kind_of):
                    choices = node.dup_available_string_values() if kind == "enum" else None
                    setter(name, parse_value(kind, name, text, choices))
                    return getter(name)
        except self.glib.Error as exc:
            raise MradError(f"the camera refused {name}={text}: {exc.message}") from None
        raise MradError(f"feature {name} ({type(node).__name__}) cannot be set from the command line")

    def _feature_names(self) -> list[str]:
        """Every feature the camera's description lists, for suggestions."""
        genicam, names, todo = self.device.get_genicam(), [], ["Root"]
        while todo:
            node = genicam.get_node(todo.pop())
            if isinstance(node, self.aravis.GcCategory):
                todo.extend(node.get_features())
            elif node is not None:
                names.append(node.get_name())
        return names

    def next_buffer(self, trigger: bool, timeout: float | None, stop) -> object | None:
        """The next buffer; None when the camera is lost (or a stop was requested)."""
        started = time.monotonic()
        if trigger:
            try:
                self.camera.software_trigger()
            except self.glib.Error:  # the camera did not take the trigger: it is gone
                return None
        while not (stop is not None and stop) and not self.lost.is_set():
            buffer = self.stream.timeout_pop_buffer(_POLL_US)
            if buffer is not None:
                return buffer
            if timeout is not None and time.monotonic() - started > timeout:
                return None
        return None

    def close(self) -> None:
        """Stop acquiring (not when the camera is gone: that would wait for register timeouts) and let go."""
        if self.stream is not None and not self.lost.is_set():
            try:
                self.camera.stop_acquisition()
            except self.glib.Error:  # nothing left to stop
                pass
        self.stream = self.camera = self.device = None  # dropping the device releases the camera's control channel
