"""Logging for every command: human lines by default, JSON lines for machines.

--log-format json writes one object per line on stderr:
{"time": "...Z", "level": "WARNING", "component": "collect", "message": "..."}
"""

from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("human", "json")


class _JSONFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        return json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        })


def add_arguments(parser) -> None:
    parser.add_argument("--log-format", choices=FORMATS, default="human",
                        help="human lines (default) or JSON lines on stderr, for log shippers")


def setup(component: str, verbose: bool = False, fmt: str = "human") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter(component))
    else:
        handler.setFormatter(logging.Formatter(f"fdpass {component}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def quiet_client_libraries() -> None:
    """clickhouse-connect and urllib3 log every failed HTTP attempt at WARNING;
    fdpass says once per attempt what failed and what it does about it."""
    for name in ("clickhouse_connect", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
