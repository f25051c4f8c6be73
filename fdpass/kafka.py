"""Kafka plumbing shared by the collector's publisher and the sink: one place for

- librdkafka properties: --kafka-config FILE and FDPASS_KAFKA_* variables,
  never argv (secrets); `for_client()` keeps of them what a client of one
  role takes (one rule for the producer, the consumer and the admin client);
- secrets kept out of logs: `mask()` for config dumps, a filter that blanks
  known secret values in any line, on every fdpass Kafka logger;
- bootstrap checks that make bad input a one-line UserError before anything
  connects: `parse_bootstrap()`, `check_resolvable()`;
- topic creation: `ensure_topic()`, which tells an outage (transient) from
  bad input by Kafka's error code;
- librdkafka's own log lines, each repeated line let through once a minute.

confluent_kafka is imported only by the functions that talk to Kafka, so
that argument parsing (every `fdpass` start) stays cheap.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

from fdpass.errors import UserError

log = logging.getLogger("fdpass.kafka")

ENV_PREFIX = "FDPASS_KAFKA_"
# FDPASS_KAFKA_* variables that are not librdkafka properties (scripts/kafka-local's).
ENV_NOT_PROPERTIES = {"FDPASS_KAFKA_PORT", "FDPASS_KAFKA_LIBS"}

# --- properties ---------------------------------------------------------------


def read_properties_file(path: str) -> dict:
    """key=value lines; '#' or '!' starts a comment line; blank lines ignored."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read Kafka properties file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"Kafka properties file {path} is not text (UTF-8)") from None
    props = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or " " in key:
            # Never echo the line: it may hold a secret.
            raise UserError(f"{path}:{lineno}: expected a librdkafka property as key=value")
        props[key] = value.strip()
    return props


def properties_from_env(environ: dict | None = None) -> dict:
    environ = os.environ if environ is None else environ
    props = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name not in ENV_NOT_PROPERTIES:
            props[name[len(ENV_PREFIX):].lower().replace("_", ".")] = value
    return props


def properties(config_file: str | None = None, environ: dict | None = None) -> dict:
    """The user's librdkafka properties: the file, then FDPASS_KAFKA_* (which win)."""
    props = read_properties_file(config_file) if config_file else {}
    props.update(properties_from_env(environ))
    return props


# Properties only one client role takes; the others would warn about them or
# refuse them. Everything else (connection, security, socket, client.id, ...)
# goes to every client: that is the one rule for all of fdpass's clients.
_ROLE_ONLY = {
    "producer": ("linger.", "batch.", "compression.", "queue.buffering.", "enable.idempotence", "acks",
                 "message.timeout.", "delivery.timeout.", "retries", "retry.", "max.in.flight",
                 "request.required.acks", "partitioner", "sticky.", "transaction", "delivery.report.",
                 "queue.buffering"),
    "consumer": ("group.", "enable.auto.", "auto.commit.", "auto.offset.", "offset.", "fetch.", "max.poll.",
                 "max.partition.", "session.timeout.", "heartbeat.", "isolation.", "partition.assignment.", "queued.",
                 "enable.partition.eof", "check.crcs", "coordinator."),
}
ROLES = ("producer", "consumer", "admin")


def for_client(props: dict, role: str) -> dict:
    """The properties a client of `role` (producer, consumer, admin) takes: all but the other roles' own."""
    if role not in ROLES:
        raise ValueError(f"unknown Kafka client role {role!r}")
    foreign = tuple(p for r, prefixes in _ROLE_ONLY.items() if r != role for p in prefixes)
    return {k: v for k, v in props.items() if not k.startswith(foreign)}


# --- secrets ------------------------------------------------------------------

_SECRET_WORDS = ("password", "secret", "token", ".pem", "jaas", "credential", "private")


def is_secret(prop: str) -> bool:
    prop = prop.lower()
    return any(word in prop for word in _SECRET_WORDS)


def mask(config: dict) -> dict:
    """A copy of a librdkafka config fit for logs: secret values replaced."""
    return {k: ("***" if is_secret(k) else v) for k, v in config.items()}


class _SecretScrubber(logging.Filter):
    """Replaces known secret values in any record that passes (belt and braces:
    librdkafka does not print property values, but its messages are not ours)."""

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            clean = self.scrub(text)
            if clean != text:
                record.msg, record.args = clean, None
        return True


SCRUBBER = _SecretScrubber()


def remember_secrets(config: dict) -> None:
    """Blank these secret values wherever they would appear in a log line."""
    # Short values would blank out ordinary words in log lines; real secrets are longer.
    SCRUBBER.secrets.update(str(v) for k, v in config.items() if is_secret(k) and len(str(v)) >= 4)


def scrub(text: str) -> str:
    return SCRUBBER.scrub(text)


class _RepeatFilter(logging.Filter):
    """Lets one line through once per `period` s: a broker that is down for an
    hour must not write the same "connection refused" lines every second."""

    def __init__(self, period: float = 60.0):
        super().__init__()
        self.period = period
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        now = time.monotonic()
        if now - self._seen.get(text, -self.period) < self.period:
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[text] = now
        return True


def guard_logger(logger: logging.Logger, repeats: bool = False) -> logging.Logger:
    """A Kafka logger of fdpass's: secrets scrubbed; with repeats, each line once a minute."""
    if repeats:
        logger.addFilter(_RepeatFilter())
    logger.addFilter(SCRUBBER)
    return logger


# librdkafka's own log lines and error callbacks, for every fdpass client
# (librdkafka does not print property values; secrets stay out).
LIBRDKAFKA_LOG = guard_logger(logging.getLogger("fdpass.kafka.librdkafka"), repeats=True)
guard_logger(log)
# A client whose failures its owner reports itself (the topic checks) logs here: nowhere.
QUIET = logging.getLogger("fdpass.kafka.quiet")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def short_reason(text: str) -> str:
    """librdkafka's error text without its broker prefix and state suffix:
    "10.0.0.7:9092/bootstrap: Connect to ipv4#10.0.0.7:9092 failed: Connection refused (after 0ms in state
    CONNECT)" -> "Connect to ipv4#10.0.0.7:9092 failed: Connection refused"."""
    text = re.sub(r"^\S+/\S+: ", "", text)
    return re.sub(r" \(after \d+ms in state \w+.*\)$", "", text)


# --- bootstrap ----------------------------------------------------------------


def parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    """The (host, port) entries of a --kafka value; UserError (one line) for one that is not HOST:PORT.

    Accepts what librdkafka accepts: comma-separated HOST:PORT, an optional
    PROTOCOL:// prefix, and [IPv6]:PORT.
    """
    servers = []
    for item in bootstrap.split(","):
        entry = item.strip()
        addr = entry.split("://", 1)[1] if "://" in entry else entry
        if addr.startswith("["):  # [IPv6]:PORT
            host, sep, port = addr[1:].partition("]:")
        else:
            host, sep, port = addr.rpartition(":")
            if ":" in host:  # a bare IPv6 address: which colon starts the port?
                sep = ""
        if (not sep or not host or any(c.isspace() for c in host)
                or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536):
            what = f"{entry!r} in {bootstrap!r}" if entry != bootstrap.strip() else repr(bootstrap)
            raise UserError(f"--kafka {what} is not HOST:PORT (e.g. kafka-1.example:9092; IPv6 as [::1]:9092)")
        servers.append((host, int(port)))
    return servers


def check_resolvable(servers: list[tuple[str, int]]) -> None:
    """UserError naming the first host name that does not resolve.

    A temporary DNS failure (EAI_AGAIN: no name server answered) is not bad
    input but an outage; librdkafka keeps retrying the name, so it passes here.
    """
    for host, port in servers:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                log.info("cannot resolve Kafka host %s right now (%s): treated as an outage", host, exc.strerror)
                continue
            raise UserError(f"Kafka host {host!r} (--kafka) does not resolve: {exc.strerror}; "
                            "check the name") from None
        except UnicodeError:  # a label too long or empty for IDNA
            raise UserError(f"Kafka host {host!r} (--kafka) is not a valid host name") from None


# --- clients and topics ---------------------------------------------------------


def admin_client(props: dict, error_cb=None, logger: logging.Logger = QUIET):
    """An AdminClient from a client config of any role; UserError for a bad property."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    conf = {**for_client(props, "admin"), "logger": logger}
    if error_cb is not None:
        conf["error_cb"] = error_cb
    try:
        return AdminClient(conf)
    except KafkaException as exc:
        raise UserError(scrub(f"bad Kafka configuration: {exc.args[0].str()}")) from None
    except (ValueError, TypeError) as exc:
        raise UserError(scrub(f"bad Kafka configuration: {exc}")) from None


def transient_codes() -> set:
    """Kafka error codes that mean "not now" (an outage, an election), not "never"."""
    from confluent_kafka import KafkaError

    return {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT,
            KafkaError.REQUEST_TIMED_OUT, KafkaError.BROKER_NOT_AVAILABLE, KafkaError.LEADER_NOT_AVAILABLE,
            KafkaError.NOT_CONTROLLER}


class TopicProblem(Exception):
    """The topic is not usable yet; `transient` when Kafka may just need time."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def ensure_topic(admin, md, topic: str, partitions: int, replication: int, timeout: float,
                 bootstrap: str, create: bool = True) -> bool:
    """The topic exists when this returns: True if this call created it.

    md: the cluster metadata (admin.list_topics()). TopicProblem when it does
    not exist and may not be created (create=False), or Kafka refuses or does
    not confirm creating it; a topic created meanwhile by someone else is fine.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    meta = md.topics.get(topic)
    if meta is not None and meta.error is None:
        return False
    if not create:
        raise TopicProblem(f"topic {topic!r} does not exist on {bootstrap} (and --no-create-topic was given): "
                           "create it or drop the flag", transient=False)
    future = admin.create_topics([NewTopic(topic, partitions, replication)], operation_timeout=timeout)[topic]
    try:
        future.result(timeout=timeout + 5)
    except KafkaException as exc:
        err = exc.args[0]
        if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:  # lost a race with another client
            return False
        raise TopicProblem(f"cannot create topic {topic!r} on {bootstrap}: {err.str()}",
                           transient=err.code() in transient_codes()) from None
    except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError since Python 3.11
        raise TopicProblem(f"Kafka at {bootstrap} did not confirm creating topic {topic!r} within {timeout + 5:.0f} s",
                           transient=True) from None
    log.info("created topic %s (%d partitions, replication %d)", topic, partitions, replication)
    return True
