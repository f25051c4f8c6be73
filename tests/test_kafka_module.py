"""fdpass/kafka.py, the Kafka plumbing collector and sink share: pure logic."""

from __future__ import annotations

import pytest

from fdpass import kafka
from fdpass.errors import UserError

SINK_CONF = {"bootstrap.servers": "k:9092", "client.id": "s", "group.id": "g", "enable.auto.commit": False,
             "auto.offset.reset": "earliest", "session.timeout.ms": 10000, "max.partition.fetch.bytes": 1,
             "queued.max.messages.kbytes": 1, "partition.assignment.strategy": "range",
             "security.protocol": "SASL_SSL", "sasl.password": "pw", "ssl.ca.location": "/ca",
             "topic.metadata.refresh.interval.ms": 10000}
PRODUCER_CONF = {"bootstrap.servers": "k:9092", "linger.ms": 20, "batch.size": 1, "compression.type": "lz4",
                 "enable.idempotence": True, "acks": "all", "message.timeout.ms": 0,
                 "delivery.report.only.error": True, "queue.buffering.max.messages": 10,
                 "statistics.interval.ms": 5000, "sasl.username": "u"}


def test_one_rule_gives_each_client_role_its_properties():
    """Connection, security and general properties reach every client; a
    role's own properties reach only that role (the admin client takes neither)."""
    dlq = kafka.for_client(SINK_CONF, "producer")
    assert dlq == {k: SINK_CONF[k] for k in ("bootstrap.servers", "client.id", "security.protocol",
                                             "sasl.password", "ssl.ca.location",
                                             "topic.metadata.refresh.interval.ms")}
    assert kafka.for_client(SINK_CONF, "admin") == dlq
    assert kafka.for_client(SINK_CONF, "consumer") == SINK_CONF
    admin = kafka.for_client(PRODUCER_CONF, "admin")
    assert admin == {"bootstrap.servers": "k:9092", "statistics.interval.ms": 5000, "sasl.username": "u"}
    assert kafka.for_client(PRODUCER_CONF, "producer") == PRODUCER_CONF
    with pytest.raises(ValueError):
        kafka.for_client(SINK_CONF, "streams")


def test_properties_file_then_environment(tmp_path):
    f = tmp_path / "k.properties"
    f.write_text("! comment\nclient.id = a\nsasl.password=from-file\n\n")
    env = {"FDPASS_KAFKA_SASL_PASSWORD": "from-env", "FDPASS_KAFKA_PORT": "9092"}
    assert kafka.properties(str(f), env) == {"client.id": "a", "sasl.password": "from-env"}
    assert kafka.properties(None, {}) == {}
    f.write_text("sasl.password hunter2\n")
    with pytest.raises(UserError) as err:
        kafka.properties(str(f), {})
    assert "k.properties:1" in str(err.value) and "hunter2" not in str(err.value)


def test_secrets_are_masked_and_scrubbed():
    assert kafka.mask({"sasl.password": "x", "ssl.key.pem": "y", "client.id": "c"}) == \
        {"sasl.password": "***", "ssl.key.pem": "***", "client.id": "c"}
    kafka.remember_secrets({"sasl.password": "s3cr3t-value", "sasl.username": "public-name"})
    assert kafka.scrub("auth failed for s3cr3t-value as public-name") == "auth failed for *** as public-name"


def test_short_reason_drops_broker_prefix_and_state():
    text = "10.0.0.7:9092/bootstrap: Connect to ipv4#10.0.0.7:9092 failed: Connection refused (after 0ms in state CONNECT)"
    assert kafka.short_reason(text) == "Connect to ipv4#10.0.0.7:9092 failed: Connection refused"
