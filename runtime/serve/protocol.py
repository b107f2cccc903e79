"""The Open Inference Protocol (KServe v2) as mrad-serve speaks it: one owner for REST and gRPC, Ray and --local.

    >>> model = Model("mrad", recipe="default")
    >>> request = rest_request(body, headers.get(HEADER_LENGTH), model, limits)  # or grpc_request(message, ...)
    >>> request.images          # each an encoded image file's bytes or an HxWx3 uint8 RGB array, in order
    ('\\x89PNG...',)
    >>> scored = await backend.score(request.images, want_map=request.want_map)
    >>> body, headers = rest_response(model, request, scored, limits)           # or grpc_response(...)

The model takes one input, either of:

- ``image``: BYTES [N], each element an encoded image file (PNG, JPEG, TIFF,
  ...), decoded with the runtime's own reader (pixel limit from the header);
- ``pixels``: UINT8 [N, H, W, 3] (or [H, W, 3]), RGB.

It answers ``score`` FP32 [N] and ``decision`` BYTES [N] ("anomalous",
"normal", or empty without a threshold) by default, and ``anomaly_map``
FP32 [N, H, W] only when the request names it among its outputs (one size for
the N images). Request parameters ``part_id`` (echoed back) and ``recipe``
(checked against the recipe served) label a request; the response's
parameters name the recipe and threshold that judged it.

Tensors travel as JSON (``data``) or, with the binary tensor data
extension, as bytes after the JSON (``binary_data_size``; the header
``Inference-Header-Content-Length`` says where the JSON ends). In JSON an
``image`` element is base64 text. gRPC carries tensors in
``raw_input_contents`` / ``raw_output_contents`` or in typed ``contents``.
A request that breaks these rules gets :class:`ProtocolError`: an HTTP status
with the protocol's error object ``{"error": "..."}``, or a gRPC status code
with the same message.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import defaults
from ..errors import MradError

IMAGE, PIXELS = "image", "pixels"  # the inputs
SCORE, DECISION, ANOMALY_MAP = "score", "decision", "anomaly_map"  # the outputs
PART_ID, RECIPE, THRESHOLD = "part_id", "recipe", "threshold"  # parameters
DEFAULT_OUTPUTS = (SCORE, DECISION)  # a request naming no outputs gets these; the map only when named
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension: bytes of JSON before the tensors
VERSION = "1"  # the one version of each model served; requests may leave it out
PLATFORM = "mrad-edge"
SERVER = "mrad-serve"
EXTENSIONS = ("binary_tensor_data",)

# What one request may be (mrad-serve's options of the same names set them).
MAX_BODY_BYTES = 64 * 1024 * 1024  # a request's body: a 4K frame as pixels is 25 MB, as PNG less
MAX_REQUEST_IMAGES = 64  # images in one request (the batch axis)
# Images above this are refused from their header (or a pixels tensor's shape), before decoding: a 97 KB
# PNG can declare 100 megapixels, and its map, overlay and batch cost about 100 bytes a pixel.
MAX_PIXELS = 25_000_000  # above the largest common line camera (24.5 MP)
MAX_JSON_MAP_VALUES = 4_000_000  # an anomaly_map written as JSON numbers (about 12 bytes each); binary beyond
MAX_LABEL_CHARS = 256  # a part_id, recipe or ?source= label echoed back
# How long a request may take to arrive: its headers (and an idle keep-alive connection waits as long), then its
# body. A client sending a byte at a time is cut off, so slow uploads cannot pile up; 64 MB arrive in 30 s at
# 20 Mbit/s.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_FORM_PARTS = 16  # parts of a multipart/form-data POST /predict (the email parser's cost grows with them)

HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
                413: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class ProtocolError(MradError):
    """A request the protocol refuses: ``status`` is its HTTP status code, ``grpc_code`` the gRPC one's name."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    @property
    def grpc_code(self) -> str:
        return HTTP_TO_GRPC.get(self.status, "UNKNOWN")

    def body(self) -> bytes:
        """The protocol's error object."""
        return error_body(str(self))


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


@dataclass(frozen=True)
class Limits:
    """How large a request may be, and how long it may take to arrive (the HTTP side's own bounds)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_request_images: int = MAX_REQUEST_IMAGES
    max_pixels: int = MAX_PIXELS
    max_json_map_values: int = MAX_JSON_MAP_VALUES
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_form_parts: int = MAX_FORM_PARTS


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


INPUTS = (TensorSpec(IMAGE, "BYTES", (-1,)), TensorSpec(PIXELS, "UINT8", (-1, -1, -1, 3)))
OUTPUTS = (TensorSpec(SCORE, "FP32", (-1,)), TensorSpec(DECISION, "BYTES", (-1,)),
           TensorSpec(ANOMALY_MAP, "FP32", (-1, -1, -1)))
_OUTPUT = {spec.name: spec for spec in OUTPUTS}


@dataclass(frozen=True)
class Model:
    """The one model a mrad-serve serves: its name (the route's, ``mrad`` by default) and the recipe behind it."""

    name: str
    recipe: str

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [VERSION], "platform": PLATFORM,
                "inputs": [spec.to_dict() for spec in INPUTS], "outputs": [spec.to_dict() for spec in OUTPUTS]}

    def check(self, name: str, version: str = "") -> None:
        """A request's model name and version: this model's, else 404."""
        if name != self.name:
            raise ProtocolError(f"no model named {name[:MAX_LABEL_CHARS]!r}: this server serves {self.name!r}", 404)
        if version not in ("", VERSION):
            raise ProtocolError(f"model {self.name!r} has version {VERSION} only, not {version[:MAX_LABEL_CHARS]!r}",
                                404)


def server_metadata(version: str) -> dict:
    return {"name": SERVER, "version": version, "extensions": list(EXTENSIONS)}


@dataclass(frozen=True)
class InferRequest:
    """What an inference request asks, whichever way it came: the images, in order, and what to answer."""

    id: str
    images: tuple
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    binary: frozenset[str] = field(default_factory=frozenset)  # outputs to answer as binary data (REST)
    part_id: str | None = None
    recipe: str | None = None

    @property
    def want_map(self) -> bool:
        return ANOMALY_MAP in self.outputs


# -- requests: REST ------------------------------------------------------------------------------


def rest_request(body: bytes, header_length: str | None, model: Model, limits: Limits = Limits()) -> InferRequest:
    """An HTTP inference request's body (JSON, then binary tensors when ``header_length`` is given)."""
    size = len(body)
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be a whole number of bytes, not {header_length[:32]!r}") \
                from None
        if not 0 <= json_size <= size:
            raise ProtocolError(f"{HEADER_LENGTH} {json_size} does not fit a body of {size} bytes")
    else:
        json_size = size
    try:
        header = json.loads(bytes(body[:json_size]))
    except (UnicodeDecodeError, ValueError) as exc:
        hint = f"; binary tensors follow the JSON only with the {HEADER_LENGTH} header" if header_length is None else ""
        raise ProtocolError(f"the request is not valid JSON ({exc}){hint}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the request must be a JSON object with \"inputs\"")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request has no \"inputs\": send \"image\" (BYTES) or \"pixels\" (UINT8)")
    tensors, offset = [], json_size
    for entry in inputs:
        if not isinstance(entry, dict):
            raise ProtocolError("each of \"inputs\" must be an object with name, datatype, shape and data")
        parameters = _object(entry.get("parameters"), "an input's \"parameters\"")
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            if not _is_int(binary_size) or binary_size < 0 or offset + binary_size > size:
                raise ProtocolError(f"input {_name(entry)!r}: binary_data_size {binary_size!r} does not fit the "
                                    f"{size - offset} bytes left in the body")
            data, offset = memoryview(body)[offset:offset + binary_size], offset + binary_size
        elif "data" in entry:
            data = _JsonData(entry["data"])
        else:
            raise ProtocolError(f"input {_name(entry)!r} has neither \"data\" nor a binary_data_size parameter")
        tensors.append((_name(entry), entry.get("datatype"), entry.get("shape"), data))
    if offset != size:
        raise ProtocolError(f"{size - offset} bytes after the last binary tensor: each needs its binary_data_size")
    parameters = _object(header.get("parameters"), "the request's \"parameters\"")
    everything_binary = parameters.get("binary_data_output") is True
    outputs, binary = [], set()
    requested = header.get("outputs")
    if requested is not None:
        if not isinstance(requested, list):
            raise ProtocolError("\"outputs\" must be a list of objects with a name")
        for entry in requested:
            if not isinstance(entry, dict):
                raise ProtocolError("\"outputs\" must be a list of objects with a name")
            options = _object(entry.get("parameters"), "an output's \"parameters\"")
            outputs.append(_name(entry))
            if options.get("binary_data", everything_binary) is True:
                binary.add(_name(entry))
    elif everything_binary:
        binary.update(spec.name for spec in OUTPUTS)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise ProtocolError("\"id\" must be a string")
    return _request(request_id, tensors, outputs, binary, parameters, model, limits)


class _JsonData:
    """A tensor's ``data`` as the JSON gave it (nested or flat lists)."""

    def __init__(self, value: Any):
        self.value = value


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _name(entry: dict) -> str:
    name = entry.get("name")
    if not isinstance(name, str):
        raise ProtocolError("each input and output needs a \"name\" (a string)")
    return name[:MAX_LABEL_CHARS]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- requests: gRPC ------------------------------------------------------------------------------


def grpc_request(message, model: Model, limits: Limits = Limits()) -> InferRequest:
    """A gRPC ModelInferRequest (see :mod:`.open_inference_pb`)."""
    model.check(message.model_name, message.model_version)
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise ProtocolError(f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs: one "
                            "per input, in order")
    tensors = []
    for n, entry in enumerate(message.inputs):
        if raw:
            data = raw[n]
        elif entry.datatype == "BYTES":
            data = list(entry.contents.bytes_contents)
        else:
            data = _GrpcValues(entry.contents.uint_contents)
        tensors.append((entry.name[:MAX_LABEL_CHARS], entry.datatype, list(entry.shape), data))
    parameters = {key: _parameter(value) for key, value in message.parameters.items()}
    outputs = [entry.name[:MAX_LABEL_CHARS] for entry in message.outputs]
    return _request(message.id, tensors, outputs, set(), parameters, model, limits)


class _GrpcValues:
    """A UINT8 tensor as gRPC's typed contents give it (uint_contents, 32 bits an element)."""

    def __init__(self, values):
        self.values = values


def _parameter(value) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


# -- requests: both ------------------------------------------------------------------------------


def _request(request_id: str, tensors: list, outputs: list[str], binary: set[str], parameters: dict, model: Model,
             limits: Limits) -> InferRequest:
    names = [t[0] for t in tensors]
    if len(tensors) != 1 or names[0] not in (IMAGE, PIXELS):
        raise ProtocolError(f"send one input, {IMAGE!r} (BYTES, encoded image files) or {PIXELS!r} (UINT8 "
                            f"[N, H, W, 3], RGB); got {', '.join(map(repr, names)) or 'none'}")
    name, datatype, shape, data = tensors[0]
    images = _images(name, datatype, shape, data, limits) if name == IMAGE else _pixels(datatype, shape, data, limits)
    unknown = [n for n in outputs if n not in _OUTPUT]
    if unknown:
        raise ProtocolError(f"no output named {unknown[0]!r}: the outputs are {', '.join(_OUTPUT)}")
    if len(set(outputs)) != len(outputs):
        raise ProtocolError("an output is named twice")
    part_id, recipe = _label(parameters.get(PART_ID), PART_ID), _label(parameters.get(RECIPE), RECIPE)
    if recipe is not None and recipe != model.recipe:
        raise ProtocolError(f"recipe {recipe!r} is not served here: model {model.name!r} is recipe {model.recipe!r}")
    return InferRequest(request_id[:MAX_LABEL_CHARS], tuple(images), tuple(outputs) or DEFAULT_OUTPUTS,
                        frozenset(binary), part_id, recipe)


def _label(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if _is_int(value):
        value = str(value)
    if not isinstance(value, str):
        raise ProtocolError(f"parameter {what!r} must be a string or a whole number")
    if len(value) > MAX_LABEL_CHARS:
        raise ProtocolError(f"parameter {what!r} is {len(value)} characters long; at most {MAX_LABEL_CHARS}")
    return value


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: \"shape\" must be a list of sizes (whole numbers >= 0)")
    return tuple(shape)


def _images(name: str, datatype: Any, shape: Any, data: Any, limits: Limits) -> list[bytes]:
    if datatype != "BYTES":
        raise ProtocolError(f"input {IMAGE!r} is BYTES (encoded image files), not {datatype!r}; send pixels as "
                            f"{PIXELS!r} (UINT8)")
    count = math.prod(_shape(shape, name))
    _check_count(count, name, limits)
    if isinstance(data, _JsonData):
        elements = _flat(data.value, count, name)
        images = []
        for element in elements:
            if not isinstance(element, str):
                raise ProtocolError(f"input {IMAGE!r}: in JSON each image is base64 text (or send the tensor as "
                                    "binary data, binary_data_size)")
            try:
                images.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError):
                raise ProtocolError(f"input {IMAGE!r}: an element is not base64 text (in JSON each image is base64; "
                                    "or send the tensor as binary data)") from None
        return images
    if isinstance(data, list):  # gRPC bytes_contents
        if len(data) != count:
            raise ProtocolError(f"input {IMAGE!r} has shape {list(shape)} but {len(data)} elements")
        return data
    return split_bytes(bytes(data), count, name)


def split_bytes(raw: bytes, count: int, name: str = IMAGE) -> list[bytes]:
    """A BYTES tensor's binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: the binary data ends before element {len(elements) + 1} of {count} "
                                "(each element is a 4-byte little-endian length, then its bytes)")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: element {len(elements) + 1} declares {length} bytes, "
                                f"{len(raw) - offset} are left")
        elements.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise ProtocolError(f"input {name!r}: {len(raw) - offset} bytes left after its {count} elements")
    return elements


def join_bytes(elements: Sequence[bytes]) -> bytes:
    """The binary form of a BYTES tensor (the inverse of :func:`split_bytes`)."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _pixels(datatype: Any, shape: Any, data: Any, limits: Limits) -> list[np.ndarray]:
    if datatype != "UINT8":
        raise ProtocolError(f"input {PIXELS!r} is UINT8 [N, H, W, 3] RGB, not {datatype!r}")
    shape = _shape(shape, PIXELS)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ProtocolError(f"input {PIXELS!r} has shape [N, H, W, 3] (or [H, W, 3]), RGB; got {list(shape)}")
    count, height, width = shape[:3]
    _check_count(count, PIXELS, limits)
    if height < 1 or width < 1:
        raise ProtocolError(f"input {PIXELS!r}: images of {width} x {height} pixels are empty")
    if max(height, width) > defaults.MAX_IMAGE_SIDE or height * width > limits.max_pixels:
        raise ProtocolError(f"input {PIXELS!r}: images of {width} x {height} = {width * height:,} pixels are above the "
                            f"limit of {limits.max_pixels:,} (--max-pixels)")
    size = math.prod(shape)
    if isinstance(data, _JsonData):
        values = _integers(data.value, size, 255)
    elif isinstance(data, _GrpcValues):
        values = _integers(list(data.values), size, 255)
    else:
        if len(data) != size:
            raise ProtocolError(f"input {PIXELS!r} has shape {list(shape)}: {size} bytes, not {len(data)}")
        values = np.frombuffer(data, dtype=np.uint8)
    return list(values.reshape(shape))


def _check_count(count: int, name: str, limits: Limits) -> None:
    if count < 1:
        raise ProtocolError(f"input {name!r} holds no image")
    if count > limits.max_request_images:
        raise ProtocolError(f"input {name!r} holds {count} images; at most {limits.max_request_images} a request "
                            "(--max-request-images)")


def _flat(value: Any, count: int, name: str) -> list:
    """Nested or flat JSON lists, row-major, as one list of ``count`` elements."""
    out: list = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > count:
                break
    if len(out) != count:
        raise ProtocolError(f"input {name!r}: \"data\" holds {'more' if len(out) > count else len(out)} elements, "
                            f"its shape says {count}")
    return out


def _integers(value: Any, size: int, top: int) -> np.ndarray:
    try:
        values = np.asarray(value)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {PIXELS!r}: \"data\" must be numbers in lists of one shape") from None
    if values.size != size or values.dtype.kind not in "iu" or (size and (values.min() < 0 or values.max() > top)):
        raise ProtocolError(f"input {PIXELS!r}: \"data\" must hold {size} whole numbers from 0 to {top}")
    return values.astype(np.uint8).reshape(-1)


# -- answers -------------------------------------------------------------------------------------


def output_tensors(request: InferRequest, scored: Sequence) -> list[tuple[str, str, list[int], Any]]:
    """(name, datatype, shape, values) of each output asked for: FP32 arrays, BYTES as lists of bytes."""
    out = []
    for name in request.outputs:
        if name == SCORE:
            out.append((name, "FP32", [len(scored)], np.asarray([s.result.score for s in scored], dtype=np.float32)))
        elif name == DECISION:
            out.append((name, "BYTES", [len(scored)], [(s.result.decision or "").encode() for s in scored]))
        else:
            sizes = {s.map_size for s in scored}
            if len(sizes) != 1:
                raise ProtocolError(f"{ANOMALY_MAP} is one tensor [N, H, W]: these images have sizes "
                                    f"{', '.join(f'{w} x {h}' for h, w in sorted(sizes))}; send them in separate "
                                    "requests")
            maps = np.stack([np.asarray(s.result.anomaly_map, dtype=np.float32) for s in scored])
            out.append((name, "FP32", list(maps.shape), maps))
    return out


def response_parameters(request: InferRequest, scored: Sequence) -> dict:
    """What judged the images (recipe, threshold) and the request's own part id."""
    first = scored[0].result
    parameters = {RECIPE: first.recipe or ""}
    threshold = (first.scored_by or {}).get("threshold")
    if threshold is not None:
        parameters[THRESHOLD] = float(threshold)
    if request.part_id is not None:
        parameters[PART_ID] = request.part_id
    return parameters


def rest_response(model: Model, request: InferRequest, scored: Sequence,
                  limits: Limits = Limits()) -> tuple[bytes, dict[str, str]]:
    """The HTTP answer's body and headers: JSON, then the binary outputs (their sizes in the JSON)."""
    outputs, tails = [], []
    for name, datatype, shape, values in output_tensors(request, scored):
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if name in request.binary:
            raw = join_bytes(values) if datatype == "BYTES" else np.ascontiguousarray(values, "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [v.decode() for v in values]
        else:
            if name == ANOMALY_MAP and values.size > limits.max_json_map_values:
                raise ProtocolError(f"{ANOMALY_MAP} of {values.size:,} values is too large for JSON (at most "
                                    f"{limits.max_json_map_values:,}); ask for it as binary data "
                                    "(\"parameters\": {\"binary_data\": true})")
            entry["data"] = values.reshape(-1).tolist()
        outputs.append(entry)
    answer = {"model_name": model.name, "model_version": VERSION, "outputs": outputs,
              "parameters": response_parameters(request, scored)}
    if request.id:
        answer["id"] = request.id
    header = json.dumps(answer).encode()
    if not tails:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *tails]), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def grpc_response(model: Model, request: InferRequest, scored: Sequence):
    """The gRPC ModelInferResponse: each output's bytes in raw_output_contents, in order."""
    from . import open_inference_pb as pb

    answer = pb.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
    for key, value in response_parameters(request, scored).items():
        answer.parameters[key].CopyFrom(grpc_parameter(value))
    for name, datatype, shape, values in output_tensors(request, scored):
        answer.outputs.add(name=name, datatype=datatype, shape=shape)
        answer.raw_output_contents.append(join_bytes(values) if datatype == "BYTES"
                                          else np.ascontiguousarray(values, "<f4").tobytes())
    return answer


def grpc_parameter(value: Any):
    from . import open_inference_pb as pb

    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))
