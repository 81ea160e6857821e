"""Parse the payloads DeepStream's nvmsgconv publishes (through nvmsgbroker) into gallery items.

Four shapes are read, told apart by their content:

- full schema (``payload-type=0``), JSON, one object a message: ``messageid``, ``@timestamp``,
  ``sensor: {id}``, ``object: {id, <type>: {...}, bbox: {topleftx, toplefty, bottomrightx, bottomrighty},
  embedding: {embedding_length, embedding_vector: [...]}}``. The object's type is the key of its one
  attribute object (``person``, ``vehicle``, ``face``, ``product``; the detector's label with msg2p-newapi).
- minimal schema (``payload-type=1``), JSON: ``version``, ``id``, ``@timestamp``, ``sensorId``,
  ``objects: ["trackingId|left|top|right|bottom|type[|#|attributes...][|#|embedding|v0,v1,...|]", ...]``.
- nv.Frame (``payload-type=2``), protobuf: field numbers in ``nvframe.proto`` beside this file.
- nv.Frame as proto3 JSON (what ``json_format`` or a Metropolis service writes of the same message):
  ``version``, ``id``, ``timestamp``, ``sensorId``, ``objects: [{id, type, bbox: {leftX, topY, rightX,
  bottomY}, embedding: {vector: [...]}}]``. The schema's field names are camelCase already, so the proto
  names and the JSON names are the same; zeros are omitted (a missing bbox side is 0), and floats may be
  strings ("NaN", "1.5").

Sources: DeepStream's ``sources/libs/nvmsgconv/deepstream_schema/`` (``eventmsg_payload.cpp``:
``generate_object_object``, ``generate_event_message``, ``generate_event_message_minimal``,
``generate_event_message_protobuf``; ``dsmeta_payload.cpp``; ``schema.proto``) and
``sources/includes/nvdsmeta_schema.h`` (``NvDsPayloadType``, ``NvDsEmbedding``), read in DeepStream 6.2
(github.com/hiennguyen9874/deepstream-sources, commit f9948312); the nv.Frame field numbers match the
DeepStream 9.2 API reference (docs.nvidia.com/metropolis/deepstream/dev-guide/sdk-api/classnv_1_1Frame.html
and its Object, Bbox, Embedding pages). Plugin: docs.nvidia.com/deepstream/text/DS_plugin_gst-nvmsgconv.html.
Protobuf: protobuf.dev/programming-guides/encoding/ (wire format), protobuf.dev/programming-guides/json/
(JSON mapping). The JSON schemas of DeepStream releases after 6.2 were not checked.

Every object becomes an item or a rejection with a one-line reason; a message that cannot be read at all
(not JSON or protobuf, no sensor id, a timestamp that is not RFC 3339: all formats carry one per message)
is one rejection. Nothing raises on bad input. An item's id is ``{sensorId}/{object id}/{timestamp}``, the
timestamp as written; a binary Timestamp is written as proto3 JSON writes it, so both renderings of a frame
give the same ids.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple

import numpy as np

from reid_deploy.retrieval.feature_files import UNIT_TOLERANCE  # |norm - 1| above it: not our models' output

BBOX_SIDES = ("left", "top", "right", "bottom")
FULL_BBOX_KEYS = ("topleftx", "toplefty", "bottomrightx", "bottomrighty")
FRAME_BBOX_KEYS = ("leftX", "topY", "rightX", "bottomY")
FULL_OBJECT_PARTS = {"bbox", "location", "coordinate", "pose", "embedding"}  # the full schema's non-type objects
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?(?:[Zz]|([+-])(\d\d):(\d\d))", re.ASCII)
_UNIX_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True)
class ParsedItem:
    """One object that can go into the gallery."""

    id: str  # "{sensorId}/{object id}/{timestamp as the message writes it; empty when absent}"
    camera: str
    track_id: str
    timestamp: float | None  # epoch seconds; None when the message has no timestamp
    feature: np.ndarray  # float32 [feat_dim], unit length
    meta: dict[str, Any]  # {"bbox": {"left", "top", "right", "bottom"}, "type": str (when given)}


@dataclass(frozen=True)
class Rejection:
    """An object (``object_index``) or the whole message (None) that cannot be used, and why."""

    reason: str
    object_index: int | None = None


@dataclass
class ParsedMessage:
    """What one payload gave: its usable objects, and what could not be used."""

    items: list[ParsedItem] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


class _Unusable(ValueError):
    """Raised inside the parser with the reason a message or object cannot be used."""


class _Header(NamedTuple):
    camera: str
    timestamp_text: str | None
    timestamp: float | None


class _Object(NamedTuple):
    track_id: str
    bbox: dict[str, float]
    type: str | None
    vector: Any  # the embedding's values as found (list of numbers or strings), None when absent


def parse_message(payload: bytes | str, feat_dim: int) -> ParsedMessage:
    """Parse one broker payload: JSON (full, minimal or nv.Frame schema) or binary nv.Frame protobuf."""
    parsed = ParsedMessage()
    try:
        header, read_object, raw_objects = _read_message(payload)
    except Exception as error:
        parsed.rejected.append(Rejection(_reason(error)))
        return parsed
    for index, raw in enumerate(raw_objects):
        try:
            parsed.items.append(_item(header, read_object(raw), feat_dim))
        except Exception as error:
            parsed.rejected.append(Rejection(f"object {index}: {_reason(error)}", index))
    return parsed


def _read_message(payload: bytes | str) -> tuple[_Header, Callable[[Any], _Object], list]:
    """The message's header, the reader of its objects and the objects as found."""
    if not payload:
        raise _Unusable("empty payload")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as error:
        if isinstance(payload, str):
            raise _Unusable(f"not JSON: {error}") from None
        try:
            frame = _decode(payload)
        except _Unusable as proto_error:
            raise _Unusable(f"not JSON or protobuf ({proto_error})") from None
        return _read_protobuf(frame)
    if not isinstance(document, dict):
        raise _Unusable(f"JSON top level is {type(document).__name__}, not an object")
    if "objects" in document:  # minimal schema or nv.Frame JSON
        objects = document["objects"]
        if not isinstance(objects, list):
            raise _Unusable("'objects' is not an array")
        timestamp = document.get("@timestamp", document.get("timestamp"))
        return _header(document.get("sensorId"), "sensorId", timestamp), _listed_object, objects
    if "object" in document:  # full schema
        sensor = _mapping(document.get("sensor"), "sensor")
        return _header(sensor.get("id"), "sensor id", document.get("@timestamp")), _full_object, [document["object"]]
    raise _Unusable("JSON has neither 'objects' (minimal schema, nv.Frame) nor 'object' (full schema)")


def _header(camera: Any, camera_name: str, timestamp: Any) -> _Header:
    camera = _text(camera, camera_name)
    if timestamp is None:
        return _Header(camera, None, None)
    if not isinstance(timestamp, str):
        raise _Unusable("timestamp is not a string")
    return _Header(camera, timestamp, rfc3339_seconds(timestamp))


def rfc3339_seconds(text: str) -> float:
    """Epoch seconds of an RFC 3339 date-time with its zone ("2024-01-01T12:00:00.123Z"); ValueError naming the
    problem otherwise."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _Unusable(f"timestamp {text[:40]!r} is not RFC 3339")
    *date_time, fraction, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    try:
        moment = datetime(*map(int, date_time), tzinfo=timezone(-offset if sign == "-" else offset))
    except ValueError:  # no such date, time or offset ("2024-02-30", "25:00", "+24:00")
        raise _Unusable(f"timestamp {text[:40]!r} is not a valid date and time") from None
    return moment.timestamp() + float(fraction or 0)


def _listed_object(raw: Any) -> _Object:
    """An entry of 'objects': a minimal-schema string or an nv.Frame JSON object."""
    if isinstance(raw, str):
        return _minimal_object(raw)
    if not isinstance(raw, dict):
        raise _Unusable("is neither a string (minimal schema) nor a JSON object (nv.Frame)")
    embedding = raw.get("embedding")
    vector = None if embedding is None else _mapping(embedding, "embedding").get("vector")
    return _Object(_text(raw.get("id"), "id"), _bbox(raw.get("bbox"), FRAME_BBOX_KEYS), _label(raw.get("type")), vector)


def _minimal_object(text: str) -> _Object:
    fields = text.split("|")
    if len(fields) < 6:
        raise _Unusable(f"has {len(fields)} '|'-separated fields, the minimal schema has 6 or more")
    vector = next((fields[i + 2].split(",") for i in range(6, len(fields) - 2)
                   if fields[i] == "#" and fields[i + 1] == "embedding"), None)
    bbox = {side: _number(value, "bbox") for side, value in zip(BBOX_SIDES, fields[1:5])}
    return _Object(_text(fields[0], "id"), _finite(bbox), fields[5] or None, vector)


def _full_object(raw: Any) -> _Object:
    raw = _mapping(raw, "'object'")
    label = next((key for key, value in raw.items() if isinstance(value, dict) and key not in FULL_OBJECT_PARTS), None)
    embedding = raw.get("embedding")
    vector = None if embedding is None else _mapping(embedding, "embedding").get("embedding_vector")
    return _Object(_text(raw.get("id"), "id"), _bbox(raw.get("bbox"), FULL_BBOX_KEYS), label, vector)


def _bbox(raw: Any, keys: tuple[str, ...]) -> dict[str, float]:
    """The box from ``raw``'s ``keys`` (left, top, right, bottom); missing sides are 0, as proto3 omits zeros."""
    raw = {} if raw is None else _mapping(raw, "bbox")
    return _finite({side: _number(raw.get(key, 0), "bbox") for side, key in zip(BBOX_SIDES, keys)})


def _finite(bbox: dict[str, float]) -> dict[str, float]:
    if not all(math.isfinite(value) for value in bbox.values()):
        raise _Unusable("bbox holds NaN or infinity")
    return bbox


def _item(header: _Header, found: _Object, feat_dim: int) -> ParsedItem:
    if found.vector is None or found.vector == []:
        raise _Unusable("no embedding")
    if not isinstance(found.vector, list):
        raise _Unusable("embedding is not an array")
    values = [_number(value, "embedding") for value in found.vector]
    if len(values) != feat_dim:
        raise _Unusable(f"embedding has {len(values)} values, the index has {feat_dim}")
    if any(math.isnan(value) for value in values):
        raise _Unusable("embedding holds NaN")
    if any(math.isinf(value) for value in values):
        raise _Unusable("embedding holds infinity")
    norm = math.hypot(*values)
    if abs(norm - 1) > UNIT_TOLERANCE:
        raise _Unusable(f"embedding is not unit length (norm {norm:.4g})")
    meta: dict[str, Any] = {"bbox": found.bbox}
    if found.type:
        meta["type"] = found.type
    return ParsedItem(id=f"{header.camera}/{found.track_id}/{header.timestamp_text or ''}", camera=header.camera,
                      track_id=found.track_id, timestamp=header.timestamp,
                      feature=np.asarray(values, dtype=np.float32), meta=meta)


def _mapping(value: Any, name: str) -> dict:
    if value is None:
        raise _Unusable(f"no {name}")
    if not isinstance(value, dict):
        raise _Unusable(f"{name} is not a JSON object")
    return value


def _text(value: Any, name: str) -> str:
    if value is None or value == "":
        raise _Unusable(f"no {name}")
    if not isinstance(value, str):
        raise _Unusable(f"{name} is not a string")
    return value


def _label(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Unusable("type is not a string")
    return value or None


def _number(value: Any, name: str) -> float:
    """A JSON number, or a string of one (proto3 JSON writes "NaN", "Infinity" and accepts "1.5")."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    raise _Unusable(f"{name} holds {str(value)[:40]!r}, not a number")


# --- protobuf wire format (protobuf.dev/programming-guides/encoding/) ---

_Fields = dict[int, list[tuple[int, Any]]]  # field number -> [(wire type, varint or bytes), ...] in order
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _read_protobuf(frame: _Fields) -> tuple[_Header, Callable[[Any], _Object], list]:
    timestamp_text = timestamp = None
    stamp = _message(frame, 3)
    if stamp is not None:
        timestamp_text, timestamp = _rfc3339(_signed(_last(stamp, 1, _VARINT, 0)), _signed(_last(stamp, 2, _VARINT, 0)))
    header = _Header(_text(_string(frame, 4), "sensorId"), timestamp_text, timestamp)
    return header, _protobuf_object, [value for wire, value in frame.get(5, []) if wire == _LEN]


def _protobuf_object(data: bytes) -> _Object:
    fields = _decode(data)
    box, embedding = _message(fields, 2) or {}, _message(fields, 6)
    bbox = {side: _float(box, number) for number, side in enumerate(BBOX_SIDES, 1)}
    vector = None if embedding is None else _floats(embedding, 1)
    return _Object(_text(_string(fields, 1), "id"), _finite(bbox), _string(fields, 3) or None, vector)


def _rfc3339(seconds: int, nanos: int) -> tuple[str, float]:
    """A google.protobuf.Timestamp as its JSON text (0, 3, 6 or 9 fraction digits) and as epoch seconds."""
    if not 0 <= nanos < 10**9:
        raise _Unusable(f"timestamp nanos {nanos} out of range")
    try:
        moment = _UNIX_EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise _Unusable(f"timestamp seconds {seconds} out of range") from None
    digits = 9 if nanos % 1000 else 6 if nanos % 10**6 else 3 if nanos else 0
    fraction = f".{nanos:09d}"[:digits + 1] if digits else ""
    return f"{moment.isoformat(timespec='seconds')}{fraction}Z", seconds + nanos / 1e9


def _decode(data: bytes) -> _Fields:
    """One message's fields; groups (wire types 3, 4) are not in proto3 and fail."""
    fields: _Fields = {}
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if not 0 < number < 2**29:
            raise _Unusable(f"protobuf field number {number} is invalid")
        if wire == _VARINT:
            value, position = _varint(data, position)
        elif wire in (_I64, _I32, _LEN):
            if wire == _LEN:
                size, position = _varint(data, position)
            else:
                size = 8 if wire == _I64 else 4
            value, position = data[position:position + size], position + size
            if position > len(data):
                raise _Unusable(f"protobuf field {number} runs past the end")
        else:
            raise _Unusable(f"protobuf wire type {wire} (field {number}) is not supported")
        fields.setdefault(number, []).append((wire, value))
    return fields


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if position >= len(data):
            raise _Unusable("protobuf varint runs past the end")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & (2**64 - 1), position
    raise _Unusable("protobuf varint is longer than 10 bytes")


def _signed(value: int) -> int:
    """A varint as int64/int32 (negative numbers are written as 10-byte two's complement)."""
    return value - 2**64 if value >= 2**63 else value


def _last(fields: _Fields, number: int, wire: int, default: Any) -> Any:
    """The last value of a singular field (proto3: the last one wins)."""
    values = [value for found_wire, value in fields.get(number, []) if found_wire == wire]
    return values[-1] if values else default


def _string(fields: _Fields, number: int) -> str:
    try:
        return _last(fields, number, _LEN, b"").decode("utf-8")
    except UnicodeDecodeError:
        raise _Unusable(f"protobuf string field {number} is not UTF-8") from None


def _message(fields: _Fields, number: int) -> _Fields | None:
    """An embedded message (None when absent); several occurrences merge, as parsing them concatenated does."""
    parts = [value for wire, value in fields.get(number, []) if wire == _LEN]
    return _decode(b"".join(parts)) if parts else None


def _float(fields: _Fields, number: int) -> float:
    return struct.unpack("<f", _last(fields, number, _I32, bytes(4)))[0]


def _floats(fields: _Fields, number: int) -> list[float]:
    """A repeated float, packed (one length-delimited run) or not (one 32-bit field a value)."""
    values: list[float] = []
    for wire, value in fields.get(number, []):
        if wire == _LEN and len(value) % 4:
            raise _Unusable(f"packed floats of field {number}: {len(value)} bytes, not a multiple of 4")
        if wire in (_LEN, _I32):
            values.extend(v for (v,) in struct.iter_unpack("<f", value))
    return values


def _reason(error: Exception) -> str:
    """One line naming the problem: our own reason, else the exception's type and message."""
    text = str(error) if isinstance(error, _Unusable) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:300]
