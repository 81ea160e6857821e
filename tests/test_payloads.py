"""DeepStream broker payloads -> gallery items: the four nvmsgconv shapes, malformed input, never raising."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, timestamp_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reid_deploy.serve.ingest import payloads
from reid_deploy.serve.ingest.payloads import ParsedMessage, Rejection, parse_message

DIM = 8
STAMP = "2024-01-01T12:00:00.123Z"
STAMP_SECONDS = 1704110400.123
# DeepStream's schema.proto numbers (DeepStream 6.2 sources; DeepStream 9.2 API reference), which nvframe.proto
# must keep
DEEPSTREAM_NUMBERS = {
    "Frame": {"version": 1, "id": 2, "timestamp": 3, "sensorId": 4, "objects": 5},
    "Object": {"id": 1, "bbox": 2, "type": 3, "embedding": 6},
    "Bbox": {"leftX": 1, "topY": 2, "rightX": 3, "bottomY": 4},
    "Embedding": {"vector": 1},
}


def unit_vector(seed: int, dim: int = DIM) -> list[float]:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (vector / np.linalg.norm(vector)).tolist()


def message_classes() -> dict[str, type]:
    """Message classes built at runtime from nvframe.proto (no protoc here), in a descriptor pool of their own."""
    text = re.sub(r"//.*", "", Path(payloads.__file__).with_name("nvframe.proto").read_text())
    pool = descriptor_pool.DescriptorPool()
    timestamp_file = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp_file)
    pool.Add(timestamp_file)
    file = descriptor_pb2.FileDescriptorProto(name="nvframe.proto", package="nv", syntax="proto3",
                                              dependency=["google/protobuf/timestamp.proto"])
    kinds = descriptor_pb2.FieldDescriptorProto
    scalars = {"string": kinds.TYPE_STRING, "float": kinds.TYPE_FLOAT}
    for name, body in re.findall(r"message (\w+) \{(.*?)\}", text, re.S):
        message = file.message_type.add(name=name)
        for repeated, kind, field_name, number in re.findall(r"(repeated )?([\w.]+) (\w+) = (\d+);", body):
            field = message.field.add(name=field_name, number=int(number),
                                      label=kinds.LABEL_REPEATED if repeated else kinds.LABEL_OPTIONAL)
            if kind in scalars:
                field.type = scalars[kind]
            else:
                field.type, field.type_name = kinds.TYPE_MESSAGE, f".{kind}" if "." in kind else f".nv.{kind}"
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"nv.{name}"))
            for name in DEEPSTREAM_NUMBERS}


NV = message_classes()


def nv_frame(seconds: int = 1704110400, nanos: int = 123_000_000):
    """A frame as nvmsgconv's generate_event_message_protobuf fills it: a person with an embedding, one without."""
    frame = NV["Frame"](version="4.0", id="42", sensorId="cam-1")
    frame.timestamp.seconds, frame.timestamp.nanos = seconds, nanos
    person = frame.objects.add(id="7", type="Person")
    person.bbox.leftX, person.bbox.topY, person.bbox.rightX, person.bbox.bottomY = 100, 50.5, 180, 300
    person.embedding.vector.extend(unit_vector(0))
    bare = frame.objects.add(id="8", type="Person")
    bare.bbox.rightX, bare.bbox.bottomY = 30, 40
    return frame


def check_good_person(parsed: ParsedMessage, track_id: str = "7", stamp: str = STAMP) -> None:
    assert len(parsed.items) == 1, parsed.rejected
    item = parsed.items[0]
    assert (item.id, item.camera, item.track_id) == (f"cam-1/{track_id}/{stamp}", "cam-1", track_id)
    assert item.feature.dtype == np.float32 and item.feature.shape == (DIM,)
    np.testing.assert_allclose(item.feature, unit_vector(0), atol=1e-6)


def test_nvframe_proto_keeps_deepstream_numbers():
    for name, numbers in DEEPSTREAM_NUMBERS.items():
        assert {f.name: f.number for f in NV[name].DESCRIPTOR.fields} == numbers


def test_protobuf_frame():
    data = nv_frame().SerializeToString()
    parsed = parse_message(data, DIM)
    check_good_person(parsed)
    assert parsed.items[0].timestamp == pytest.approx(STAMP_SECONDS, abs=1e-6)
    assert parsed.items[0].meta == {"bbox": {"left": 100, "top": 50.5, "right": 180, "bottom": 300}, "type": "Person"}
    assert parsed.rejected == [Rejection("object 1: no embedding", 1)]


def test_protobuf_skips_unknown_fields_and_reads_unpacked_floats():
    """confidence (4) and info (5) are skipped; a writer may send repeated floats one 32-bit field each."""
    vector = unit_vector(0)
    embedding = b"".join(b"\x0d" + struct.pack("<f", v) for v in vector)  # field 1, wire type 5
    person = NV["Object"](id="7").SerializeToString() + b"\x25" + struct.pack("<f", 0.9)  # confidence
    person += b"\x2a\x09\x0a\x03age\x12\x0230" + b"\x32" + bytes([len(embedding)]) + embedding  # info, embedding
    frame = NV["Frame"](sensorId="cam-1")
    frame.timestamp.FromJsonString(STAMP)
    frame.objects.add().MergeFromString(person)
    check_good_person(parse_message(frame.SerializeToString(), DIM))


def test_protobuf_json_gives_the_same_items():
    frame = nv_frame()
    from_binary = parse_message(frame.SerializeToString(), DIM)
    from_json = parse_message(json_format.MessageToJson(frame), DIM)
    check_good_person(from_json)
    assert from_json.items[0].meta == from_binary.items[0].meta
    assert from_json.items[0].timestamp == from_binary.items[0].timestamp
    assert from_json.rejected == from_binary.rejected


@pytest.mark.parametrize("seconds, nanos", [(1704110400, 0), (1704110400, 123_000_000), (1704110400, 123_456_000),
                                            (1704110400, 1), (-1, 500_000_000)])
def test_protobuf_timestamp_text_is_protobuf_json(seconds, nanos):
    """Binary and JSON renderings of a frame give its objects the same id."""
    frame = nv_frame(seconds, nanos)
    stamp = json.loads(json_format.MessageToJson(frame))["timestamp"]
    parsed = parse_message(frame.SerializeToString(), DIM)
    check_good_person(parsed, stamp=stamp)
    assert parsed.items[0].timestamp == pytest.approx(seconds + nanos / 1e9, abs=1e-6)


def test_full_schema():
    """As generate_event_message writes it (payload-type 0): one object, its type the key of its attributes."""
    message = {
        "messageid": "84a3a0ad-7eb8-49a2-9aa7-104ded6764d0", "mdsversion": "1.0", "@timestamp": STAMP,
        "place": {"id": "1", "name": "XYZ", "type": "garage", "location": {"lat": 30.32, "lon": -40.55, "alt": 100.0}},
        "sensor": {"id": "cam-1", "type": "Camera", "description": "Gate", "location": {"lat": 45.29, "lon": -39.56},
                   "coordinate": {"x": 5.2, "y": 10.1, "z": 11.2}},
        "analyticsModule": {"id": "XYZ", "description": "Vehicle Detection", "source": "OpenALR", "version": "1.0"},
        "object": {
            "id": "7", "speed": 0.0, "direction": 0.0, "orientation": 0.0,
            "person": {"age": 45, "gender": "male", "hair": "black", "cap": "none", "apparel": "formal",
                       "confidence": 0.9},
            "bbox": {"topleftx": 100, "toplefty": 50, "bottomrightx": 180, "bottomrighty": 300},
            "location": {"lat": 0.0, "lon": 0.0, "alt": 0.0}, "coordinate": {"x": 0.0, "y": 0.0, "z": 0.0},
            "pose": {}, "embedding": {"embedding_length": DIM, "embedding_vector": unit_vector(0)},
        },
        "event": {"id": "4f8436ab-c611-4257-8b83-b9134c6cab0d", "type": "entry"}, "videoPath": "",
    }
    parsed = parse_message(json.dumps(message).encode(), DIM)
    check_good_person(parsed)
    assert parsed.items[0].meta == {"bbox": {"left": 100, "top": 50, "right": 180, "bottom": 300}, "type": "person"}
    assert parsed.items[0].timestamp == pytest.approx(STAMP_SECONDS, abs=1e-6)
    del message["object"]["embedding"]
    assert parse_message(json.dumps(message), DIM).rejected == [Rejection("object 0: no embedding", 0)]


def test_minimal_schema():
    """As generate_event_message_minimal writes it (payload-type 1): a person without attributes gets "|#||||||",
    an embedding follows as "|#|embedding|v0,v1,...|", floats at C++ stream precision (6 digits)."""
    values = ",".join(f"{v:.6g}" for v in unit_vector(0))
    message = {"version": "4.0", "id": "42", "@timestamp": STAMP, "sensorId": "cam-1", "objects": [
        f"7|100|50.5|180|300|Person|#||||||" f"|#|embedding|{values}|",
        "957|1834|150|1918|215|Vehicle|#|sedan|Bugatti|M|blue|CA 444|California|0.8",
    ]}
    parsed = parse_message(json.dumps(message).encode(), DIM)
    check_good_person(parsed)
    assert parsed.items[0].meta == {"bbox": {"left": 100, "top": 50.5, "right": 180, "bottom": 300}, "type": "Person"}
    assert parsed.rejected == [Rejection("object 1: no embedding", 1)]


def frame_json(embedding: list, timestamp: str = STAMP, **top) -> bytes:
    """An nv.Frame JSON message with one object holding ``embedding``."""
    message = {"version": "4.0", "id": "1", "timestamp": timestamp, "sensorId": "cam-1",
               "objects": [{"id": "7", "bbox": {"leftX": 1}, "embedding": {"vector": embedding}}], **top}
    return json.dumps({k: v for k, v in message.items() if v is not None}).encode()


@pytest.mark.parametrize("payload, reason", [
    (b"\x00\x01garbage", "not JSON or protobuf (protobuf field number 0 is invalid)"),
    (b"", "empty payload"),
    ("{'single': 'quotes'}", "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (nv_frame().SerializeToString()[:-3], "not JSON or protobuf (protobuf field 5 runs past the end)"),
    (NV["Frame"](version="4.0").SerializeToString(), "no sensorId"),
    (b"\x22\x02\xff\xfe", "protobuf string field 4 is not UTF-8"),
    (b"[1, 2]", "JSON top level is list, not an object"),
    (b'{"@timestamp": "2024-01-01T12:00:00Z", "sensor": null, "object": {}}', "no sensor"),
    (b'{"messageid": "x"}', "JSON has neither 'objects' (minimal schema, nv.Frame) nor 'object' (full schema)"),
    (frame_json(unit_vector(0), sensorId=None), "no sensorId"),
    (frame_json(unit_vector(0), sensorId=3), "sensorId is not a string"),
    (frame_json(unit_vector(0), timestamp="yesterday"), "timestamp 'yesterday' is not RFC 3339"),
    (frame_json(unit_vector(0), timestamp="2024-02-30T00:00:00Z"),
     "timestamp '2024-02-30T00:00:00Z' is not a valid date and time"),
    (frame_json(unit_vector(0), timestamp="2024-01-01T12:00:00"), "timestamp '2024-01-01T12:00:00' is not RFC 3339"),
    (frame_json(unit_vector(0), objects={}), "'objects' is not an array"),
])
def test_unusable_message(payload, reason):
    assert parse_message(payload, DIM) == ParsedMessage([], [Rejection(reason)])


@pytest.mark.parametrize("embedding, reason", [
    (unit_vector(0, 4), "embedding has 4 values, the index has 8"),
    ([math.nan] + unit_vector(0, DIM - 1), "embedding holds NaN"),
    (["NaN"] + unit_vector(0, DIM - 1), "embedding holds NaN"),  # proto3 JSON's spelling
    (["-Infinity"] + unit_vector(0, DIM - 1), "embedding holds infinity"),
    ([2 * v for v in unit_vector(0)], "embedding is not unit length (norm 2)"),
    ([1e300] * DIM, "embedding is not unit length (norm 2.828e+300)"),
    ([True] * DIM, "embedding holds 'True', not a number"),
    ({"0": 1.0}, "embedding is not an array"),
    ([], "no embedding"),
    (None, "no embedding"),
])
def test_unusable_object(embedding, reason):
    assert parse_message(frame_json(embedding), DIM) == ParsedMessage([], [Rejection(f"object 0: {reason}", 0)])


def test_bad_object_leaves_the_others():
    message = json.loads(frame_json(unit_vector(0)))
    message["objects"] = ["7|1|2|3", {"id": 8}, {"id": "9", "bbox": {"leftX": "NaN"}}, "x|1|2|3|4|P|#|embedding|1,0",
                          [], message["objects"][0]]
    parsed = parse_message(json.dumps(message), DIM)
    assert [r.reason for r in parsed.rejected] == [
        "object 0: has 4 '|'-separated fields, the minimal schema has 6 or more",
        "object 1: id is not a string",
        "object 2: bbox holds NaN or infinity",
        "object 3: embedding has 2 values, the index has 8",
        "object 4: is neither a string (minimal schema) nor a JSON object (nv.Frame)",
    ]
    assert [item.id for item in parsed.items] == [f"cam-1/7/{STAMP}"]


@pytest.mark.parametrize("text, seconds", [
    ("2024-01-01T12:00:00Z", 1704110400.0),
    ("2024-01-01t13:30:00.5+01:30", 1704110400.5),
    ("2024-01-01 07:00:00.000000001-05:00", 1704110400.000000001),
])
def test_rfc3339_offsets_and_fractions(text, seconds):
    item = parse_message(frame_json(unit_vector(0, DIM), timestamp=text), DIM).items[0]
    assert item.timestamp == pytest.approx(seconds, abs=1e-6) and item.id == f"cam-1/7/{text}"


def test_no_timestamp():
    item = parse_message(frame_json(unit_vector(0), timestamp=None), DIM).items[0]
    assert (item.id, item.timestamp) == ("cam-1/7/", None)


def check_contract(parsed: ParsedMessage) -> None:
    assert isinstance(parsed, ParsedMessage)
    for rejection in parsed.rejected:
        assert rejection.reason and "\n" not in rejection.reason
    for item in parsed.items:
        assert item.feature.shape == (DIM,) and np.isfinite(item.feature).all()
        json.dumps(item.meta, allow_nan=False)  # goes to the write-ahead log


KEYS = st.sampled_from(["objects", "object", "sensorId", "sensor", "id", "@timestamp", "timestamp", "bbox",
                        "embedding", "vector", "embedding_vector", "type", "leftX", "topleftx"]) | st.text(max_size=4)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
           | st.sampled_from([STAMP, "7|1|2|3|4|Person|#|embedding|1,0,0,0,0,0,0,0|", "NaN"]))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=DIM) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=30)
VECTORS = st.lists(SCALARS, max_size=DIM + 1) | st.sampled_from([unit_vector(0), unit_vector(1, 4)])
OBJECTS = st.fixed_dictionaries({"id": SCALARS}, optional={
    "bbox": st.dictionaries(KEYS, SCALARS, max_size=4), "type": SCALARS,
    "embedding": st.fixed_dictionaries({}, optional={"vector": VECTORS, "embedding_vector": VECTORS})})
DOCUMENTS = (  # anything, nv.Frame / minimal-shaped, full-schema-shaped
    st.dictionaries(KEYS, JSON_VALUES, max_size=6)
    | st.fixed_dictionaries({"sensorId": SCALARS, "objects": st.lists(OBJECTS | JSON_VALUES, max_size=3)},
                            optional={"timestamp": SCALARS, "@timestamp": SCALARS})
    | st.fixed_dictionaries({"sensor": st.fixed_dictionaries({"id": SCALARS}), "object": OBJECTS},
                            optional={"@timestamp": SCALARS}))


@settings(max_examples=200, deadline=None)
@given(st.binary() | st.text())
@example(b"\x2a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # an 11-byte varint
@example(b"\x1a\x02\x08\x01\x22\x01a\x2a\x00")  # a frame: timestamp, sensorId "a", an empty object
def test_never_raises_on_bytes(payload):
    check_contract(parse_message(payload, DIM))


@settings(max_examples=200, deadline=None)
@given(DOCUMENTS)
@example({"objects": [{"id": "7", "embedding": {"vector": [10**400]}}], "sensorId": "c"})
def test_never_raises_on_json_objects(document):
    check_contract(parse_message(json.dumps(document), DIM))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_never_raises_on_damaged_protobuf(data):
    frame = bytearray(nv_frame().SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    check_contract(parse_message(bytes(frame[:data.draw(st.integers(0, len(frame)))]), DIM))
