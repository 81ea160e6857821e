"""Broker consumers that feed DeepStream's messages into the served gallery (``reid serve --ingest URL``).

- ``redis://host:port/STREAM``: DeepStream's Redis adapter (``libnvds_redis_proto.so``) appends each message
  to the stream named by its topic, the payload in the field ``payloadkey`` names (``metadata`` by default;
  ``?payloadkey=NAME`` here). We read it as the consumer ``reid-serve`` of the group ``reid-serve``
  (``?group=NAME``), and acknowledge (XACK) an entry only after its items are durable in the service's log;
  entries that cannot be used are copied to ``STREAM:rejected`` with the reason, then acknowledged. On a
  restart the group's pending entries (read before, never acknowledged) are read first.
- ``mqtt://host:port/TOPIC``: DeepStream's MQTT adapter (``libnvds_mqtt_proto.so``) publishes the raw payload
  on the topic. We subscribe with QoS 1 over MQTT 5 in a persistent session (clean start off, a session
  expiry of SESSION_EXPIRY_S) and acknowledge (PUBACK) a message only after its items are durable, so the
  broker delivers again whatever we had not acknowledged when we stopped, and keeps what is published while
  we are away, within its own limits (the session's expiry, its queue bound: mosquitto's
  ``max_queued_messages``, 1,000 by default).

Redelivered messages are harmless: their items' ids are held already and are skipped. A message that
cannot be used is counted (``on_rejected``) and logged, one line per reason at most every LOG_EVERY_S.
A broker that goes away is retried with backoff (BACKOFF_S, doubling to BACKOFF_MAX_S) and reported in
``status()`` (``/health/ready``)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from reid_deploy.console import log
from reid_deploy.errors import ReidError, shown
from reid_deploy.serve.ingest.payloads import parse_message
from reid_deploy.serve.searcher import Item

BATCH = 256  # messages read (and made durable) at a time
BACKOFF_S, BACKOFF_MAX_S = 0.5, 10.0
LOG_EVERY_S = 10.0
SESSION_EXPIRY_S = 3600  # how long an MQTT broker keeps our session (and queues messages) while we are away
REJECTED_PAYLOAD_BYTES = 65536  # most bytes of a rejected payload copied to STREAM:rejected


@dataclass
class Source:
    """A parsed ``--ingest`` URL."""

    url: str
    scheme: str
    host: str
    port: int
    name: str  # the Redis stream or MQTT topic
    options: dict[str, str]

    @classmethod
    def parse(cls, url: str) -> Source:
        parts = urlsplit(url)
        name = parts.path.lstrip("/")
        if parts.scheme not in ("redis", "mqtt") or not parts.hostname or not name:
            raise ReidError(f"--ingest {shown(url)}: expected redis://HOST:PORT/STREAM or mqtt://HOST:PORT/TOPIC")
        try:
            port = parts.port or (6379 if parts.scheme == "redis" else 1883)
        except ValueError:
            raise ReidError(f"--ingest {shown(url)}: the port is not a number") from None
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return cls(url, parts.scheme, parts.hostname, port, name, options)


class Consumer:
    """A thread that reads one source and adds what it carries through ``add`` (the service's durable add:
    a callable taking (features, items) and returning a future)."""

    def __init__(self, source: Source, feat_dim: int, add: Callable[[np.ndarray, list[Item]], Any],
                 on_items: Callable[[int], None] | None = None, on_rejected: Callable[[str], None] | None = None):
        self.source, self.feat_dim, self.add = source, feat_dim, add
        self.on_items, self.on_rejected = on_items or (lambda n: None), on_rejected or (lambda reason: None)
        self.connected, self.error = False, None
        self.items = self.rejected = 0
        self._stop = threading.Event()
        self._logged: dict[str, tuple[float, int]] = {}
        self._thread = threading.Thread(target=self._run, name=f"reid-ingest-{source.scheme}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def status(self) -> dict[str, Any]:
        return {"url": self.source.url, "connected": self.connected, "error": self.error, "items": self.items,
                "rejected": self.rejected}

    def _run(self) -> None:
        delay = BACKOFF_S
        while not self._stop.is_set():
            try:
                self.consume()
                delay = BACKOFF_S
            except Exception as exc:  # noqa: BLE001 - a broker going away, or one we cannot reach: retry
                self.connected, self.error = False, f"{type(exc).__name__}: {exc}"
                log.warning("ingest %s: %s; retrying in %.1f s", self.source.url, self.error, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)

    def consume(self) -> None:
        """Read the source until ``stop`` (or an error)."""
        raise NotImplementedError

    def store(self, payloads: list[bytes]) -> list[list[str]]:
        """Parse ``payloads`` and add their items, durably (returns when logged); each payload's rejection
        reasons, in order."""
        items, feats, reasons = [], [], []
        for payload in payloads:
            parsed = parse_message(payload, self.feat_dim)
            reasons.append([r.reason for r in parsed.rejected])
            for p in parsed.items:
                items.append(Item(p.id, p.camera, p.timestamp, p.track_id, p.meta))
                feats.append(p.feature)
        if items:
            self.add(np.stack(feats), items).result()
            self.items += len(items)
            self.on_items(len(items))
        for reason in (r for rs in reasons for r in rs):
            self._reject(reason)
        return reasons

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.on_rejected(reason)
        key = reason.split(":")[-1].strip()[:80]
        last, suppressed = self._logged.get(key, (0.0, 0))
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            log.warning("ingest %s: rejected a message: %s%s", self.source.url, reason,
                        f" ({suppressed} more like it not logged)" if suppressed else "")
            self._logged[key] = (now, 0)
        else:
            self._logged[key] = (last, suppressed + 1)


class RedisConsumer(Consumer):
    def consume(self) -> None:
        import redis

        s = self.source
        stream, group = s.name, s.options.get("group", "reid-serve")
        field = s.options.get("payloadkey", "metadata").encode()
        client = redis.Redis(s.host, s.port, socket_timeout=10, socket_connect_timeout=5)
        try:
            try:
                client.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.connected, self.error = True, None
            pending = True  # first the entries read before a restart and never acknowledged
            while not self._stop.is_set():
                answer = client.xreadgroup(group, "reid-serve", {stream: "0" if pending else ">"}, count=BATCH,
                                           block=None if pending else 1000)
                entries = answer[0][1] if answer else []
                if pending and not entries:
                    pending = False
                    continue
                if not entries:
                    continue
                payloads = [fields.get(field, b"") for _, fields in entries]
                reasons = self.store(payloads)
                rejected = [(entry_id, payload, rs) for (entry_id, _), payload, rs in zip(entries, payloads, reasons)
                            if rs]
                for entry_id, payload, rs in rejected:
                    client.xadd(f"{stream}:rejected", {"entry": entry_id, "reason": "; ".join(rs),
                                                       "payload": payload[:REJECTED_PAYLOAD_BYTES]})
                client.xack(stream, group, *[entry_id for entry_id, _ in entries])
        finally:
            client.close()


class MqttConsumer(Consumer):
    def consume(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.source
        received: queue.Queue = queue.Queue()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.options.get("client_id",
                             f"reid-serve-{s.name}"), protocol=mqtt.MQTTv5, manual_ack=True)
        lost = threading.Event()

        def on_connect(c, _userdata, _flags, reason, _properties):
            if reason.is_failure:
                self.error = f"connection refused: {reason}"
                lost.set()
                return
            c.subscribe(s.name, qos=1)
            self.connected, self.error = True, None

        def on_disconnect(_c, _userdata, _flags, reason, _properties):
            self.connected = False
            self.error = f"disconnected: {reason}"
            lost.set()

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        client.on_message = lambda _c, _u, message: received.put(message)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect(s.host, s.port, keepalive=30, clean_start=False, properties=properties)
        client.loop_start()
        try:
            while not self._stop.is_set() and not lost.is_set():
                try:
                    messages = [received.get(timeout=0.5)]
                except queue.Empty:
                    continue
                while len(messages) < BATCH:
                    try:
                        messages.append(received.get_nowait())
                    except queue.Empty:
                        break
                self.store([m.payload for m in messages])
                for m in messages:
                    client.ack(m.mid, m.qos)
            if lost.is_set():
                raise ConnectionError(self.error or "connection lost")
        finally:
            client.loop_stop()
            client.disconnect()


def consumer_for(url: str, feat_dim: int, add: Callable, on_items: Callable[[int], None] | None = None,
                 on_rejected: Callable[[str], None] | None = None) -> Consumer:
    """The consumer of an ``--ingest`` URL (ReidError naming the problem when it is not one)."""
    source = Source.parse(url)
    kind = RedisConsumer if source.scheme == "redis" else MqttConsumer
    return kind(source, feat_dim, add, on_items, on_rejected)
