"""`fdpass` command line: one sub-command per job, each defined next to its code.

Sub-command modules expose `register(subparsers)`; the parser they add sets
`func`, called with the parsed arguments. Modules are imported only when
their command runs would be nicer, but argparse needs every parser for
--help, so registration is cheap by rule: no heavy imports at module level
in the register functions' modules.
"""

from __future__ import annotations

import argparse
import sys

from fdpass.errors import UserError

EPILOG = """\
examples:
  fdpass run                             record on this host into embedded ClickHouse (Ctrl-C stops)
  fdpass doctor                          check this kernel and machine
  fdpass collect --jsonl                 print every passed fd as JSON lines
  fdpass collect --jsonl --pid 1234      only what process 1234 sends/receives
  fdpass collect --kafka 127.0.0.1:9092  publish Avro events to Kafka
  fdpass sink --kafka 127.0.0.1:9092 --clickhouse chdb:///var/lib/fdpass/store
  fdpass query --clickhouse chdb:///var/lib/fdpass/store "SELECT count() FROM fdpass.events"
"""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the full usage is what --help is for."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fdpass",
        description="Trace file descriptors passed between processes over unix sockets "
        "(SCM_RIGHTS) with eBPF; store them in ClickHouse for forensic SQL.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from fdpass.collector import cli as collector_cli

    collector_cli.register(sub)
    from fdpass import run as run_cli

    run_cli.register(sub)
    from fdpass import query

    query.register(sub)
    try:
        from fdpass.sinks import cli as sinks_cli
    except ImportError:  # the sink is optional while it is being built
        sinks_cli = None
    if sinks_cli is not None:
        sinks_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"fdpass {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
