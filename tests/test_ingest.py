"""``reid serve --ingest``: DeepStream-shaped messages through a real Redis server and a real MQTT broker into
the served gallery, with malformed messages mixed in and a ``kill -9`` of the service in the middle."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
from gallery_data import unit_rows

from bench.processes import Served, mosquitto, redis_server

DIM = 32
CAMERAS = ("cam-a", "cam-b", "cam-c")
PEOPLE = 6


def person_features(seed: int = 0) -> np.ndarray:
    """One direction per person; a sighting is its person's direction plus a little noise."""
    return unit_rows(np.random.default_rng(seed).normal(size=(PEOPLE, DIM)))


def frames(count: int, seed: int = 1) -> tuple[list[bytes], set[str], list[str]]:
    """``count`` messages in nv.Frame's JSON form (two objects each, every person a track per camera), with
    malformed messages and objects mixed in: (payloads, ids of the good objects, reasons expected)."""
    rng = np.random.default_rng(seed)
    people = person_features()
    payloads, good, bad = [], set(), []
    for n in range(count):
        camera = CAMERAS[(n // PEOPLE) % 3]
        stamp = f"2026-12-08T10:{n // 60:02d}:{n % 60:02d}.000Z"
        objects = []
        for person in (n % PEOPLE, (n + 1) % PEOPLE):
            feature = unit_rows((people[person] + 0.05 * rng.normal(size=DIM))[None])[0]
            objects.append({"id": str(100 + person), "type": "Person",
                            "bbox": {"leftX": 10.0, "topY": 20.0, "rightX": 60.0, "bottomY": 180.0},
                            "embedding": {"vector": feature.tolist()}})
            good.add(f"{camera}/{100 + person}/{stamp}")
        if n % 7 == 3:
            objects.append({"id": "999", "bbox": {"leftX": 1.0}})  # no embedding
            bad.append("no embedding")
        if n % 11 == 5:
            objects.append({"id": "998", "embedding": {"vector": [0.5] * 4}})
            bad.append("has 4 values")
        payloads.append(json.dumps({"version": "4.0", "id": str(n), "timestamp": stamp, "sensorId": camera,
                                    "objects": objects}).encode())
        if n % 9 == 4:
            payloads.append(b"\x00\xffnot a message")
            bad.append("not JSON or protobuf")
    return payloads, good, bad


def wait_for(condition, seconds: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def held_ids(server: Served) -> set[str]:
    """Every id the service holds (the snapshot it writes at SIGTERM)."""
    from reid_deploy.retrieval.index import GalleryIndex

    assert server.stop() == 0
    return set(GalleryIndex.load(server.index).paths)


def start(tmp_path, url: str) -> Served:
    server = Served(tmp_path / "g.index", "--create", "--feat-dim", str(DIM), "index.graph_k=16", "--ingest", url,
                    f"results_dir={tmp_path}")
    server.index = tmp_path / "g.index"
    return server


def check_track_search(server: Served) -> None:
    """A track's search returns that person's sightings from the other cameras."""
    with server.client() as client:
        reply = client._call("POST", "/v1/search", {"track": {"camera": "cam-a", "track_id": "100"}, "top_k": 5})
    matches = reply["results"][0]["matches"]
    assert len(matches) == 5
    assert all(m["camera"] != "cam-a" and m["track_id"] == "100" for m in matches)
    assert matches[0]["meta"] == {"bbox": {"left": 10.0, "top": 20.0, "right": 60.0, "bottom": 180.0},
                                  "type": "Person"}


def test_redis_stream_into_the_service_through_a_kill_9(tmp_path):
    import redis

    broker = redis_server(tmp_path)
    try:
        client = redis.Redis("127.0.0.1", broker.port)
        payloads, good, bad = frames(60)
        url = f"redis://127.0.0.1:{broker.port}/ds-events"
        server = start(tmp_path, url)
        for p in payloads[:30]:
            client.xadd("ds-events", {"metadata": p})
        wait_for(lambda: any(g["last-delivered-id"] != b"0-0" for g in client.xinfo_groups("ds-events")),
                 what="a first read (the service makes its group once it is ready)")
        os.kill(server.process.pid, signal.SIGKILL)  # mid-stream: some entries read, some acknowledged
        server.kill()
        for p in payloads[30:]:
            client.xadd("ds-events", {"metadata": p})
        again = start(tmp_path, url)
        wait_for(lambda: client.xlen("ds-events:rejected") == sum(1 for r in bad if r == "not JSON or protobuf")
                 + len({m for m in range(60) if m % 7 == 3 or m % 11 == 5})
                 and not client.xpending("ds-events", "reid-serve")["pending"]
                 and client.xinfo_groups("ds-events")[0]["last-delivered-id"] == client.xinfo_stream("ds-events")[
                     "last-generated-id"], what="every entry read and acknowledged")
        ready = httpx.get(f"{again.url}/health/ready").json()
        assert ready["ingest"][0]["connected"] and ready["ingest"][0]["rejected"] >= 1
        rejected = [fields[b"reason"].decode() for _, fields in client.xrange("ds-events:rejected")]
        for reason in ("no embedding", "has 4 values", "not JSON or protobuf"):
            assert any(reason in r for r in rejected), (reason, rejected)
        metrics = httpx.get(f"{again.url}/metrics").text
        assert f'reid_ingest_rejected_total{{source="{url}"}}' in metrics
        check_track_search(again)
        assert held_ids(again) == good
    finally:
        broker.stop()


def test_redis_going_away_is_reported_and_retried(tmp_path):
    broker = redis_server(tmp_path)
    url = f"redis://127.0.0.1:{broker.port}/ds-events"
    server = start(tmp_path, url)
    try:
        wait_for(lambda: httpx.get(f"{server.url}/health/ready").json()["ingest"][0]["connected"], what="connected")
        broker.stop()
        wait_for(lambda: not httpx.get(f"{server.url}/health/ready").json()["ingest"][0]["connected"],
                 what="the broker reported gone")
        status = httpx.get(f"{server.url}/health/ready")
        assert status.status_code == 200 and "Error" in status.json()["ingest"][0]["error"]
    finally:
        assert server.stop() == 0
        broker.stop()


def test_mqtt_topic_into_the_service_through_a_kill_9(tmp_path):
    import paho.mqtt.client as mqtt

    broker = mosquitto(tmp_path)
    try:
        payloads, good, _ = frames(45, seed=2)
        url = f"mqtt://127.0.0.1:{broker.port}/deepstream/events"
        server = start(tmp_path, url)
        wait_for(lambda: httpx.get(f"{server.url}/health/ready").json()["ingest"][0]["connected"], what="connected")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="deepstream", protocol=mqtt.MQTTv5)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()

        def publish(batch):
            for p in batch:
                publisher.publish("deepstream/events", p, qos=1).wait_for_publish(10)

        publish(payloads[:20])
        wait_for(lambda: httpx.get(f"{server.url}/health/ready").json()["ingest"][0]["items"] > 0, what="items")
        os.kill(server.process.pid, signal.SIGKILL)
        server.kill()
        publish(payloads[20:])  # while the service is down: the broker keeps them for its session
        again = start(tmp_path, url)
        wait_for(lambda: again.client().info()["items"] == len(good), what="every good object")
        publisher.loop_stop()
        publisher.disconnect()
        check_track_search(again)
        assert held_ids(again) == good
    finally:
        broker.stop()


def test_a_bad_ingest_url_is_one_line(cli, tmp_path):
    cli("serve", "--index", tmp_path / "g.index", "--create", "--feat-dim", "8", "--ingest", "kafka://host/topic"
        ).user_error("expected redis://HOST:PORT/STREAM or mqtt://HOST:PORT/TOPIC")


@pytest.mark.parametrize("body, status, words", [({"track": {"camera": "cam-z", "track_id": 1}}, 404, "no item"),
                                                 ({"track": {"camera": "cam-a"}}, 400, "track_id")])
def test_track_search_errors(tmp_path, body, status, words):
    server = Served(tmp_path / "g.index", "--create", "--feat-dim", str(DIM), f"results_dir={tmp_path}")
    try:
        reply = httpx.post(f"{server.url}/v1/search", json=body)
        assert reply.status_code == status and words in reply.json()["error"]
    finally:
        assert server.stop() == 0
