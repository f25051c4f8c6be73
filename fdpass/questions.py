"""Named forensic questions for `fdpass query NAME`, each one parameterised SQL.

Every user value reaches ClickHouse as a bound query parameter
({name:Type}); the SQL text is assembled only from the fixed fragments in
this file, so quotes or SQL in a value are data, never SQL.

Pairing a SEND with its RECV (docs/architecture.md, "Pairing"). Exact
first: the kernel's SCM_RIGHTS list (struct scm_fp_list) a descriptor
travels in has one transfer_id, unique per (host_id, boot_id), on the SEND
and on its RECV(s), and the fd's place in the list is fd_index: an equi-join
on (host_id, boot_id, transfer_id, fd_index). The RECV side is read only for
the ids of the SENDs the question selected, and only from the question's
start on (minus RECV_SLACK), so time and host filters prune both sides.

The old rule for rows without a matched id (stored before schema v3, a
send or receive the probe could not tie to the kernel's list, or an id
the other side lacks): a passed descriptor is the same open file on both
sides (file_dev, file_ino), travels from the sender's socket to its peer
(SEND.peer_sock_ino = RECV.sock_ino) at the same place in the SCM_RIGHTS
list (fd_index). The same file sent twice over one socket gives two SENDs
and two RECVs with equal keys; unix sockets deliver in order, so the k-th
unmatched SEND of a key pairs with the k-th unmatched RECV of that key
(row_number() over each side, ordered by time and sequence). Ranks are
computed over every row of the keys concerned, before any filter that could
remove one side of a pair, so a filter never shifts the pairing; only the
keys of the selected SENDs that have no exact match are ranked. A SEND
without its RECV is "undelivered" (still queued, the receiver closed the
socket, or the receiver's MSG_CTRUNC dropped it).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from fdpass import defaults
from fdpass.collector.handover import HANDOVER_RUN_BIT
from fdpass.errors import UserError

TABLE = defaults.EVENTS_TABLE

# Key of a transfer on each side for the old rule (see the module docstring).
_SEND_KEY = "host_id, boot_id, assumeNotNull(peer_sock_ino), file_dev, file_ino, fd_index"
_RECV_KEY = "host_id, boot_id, sock_ino, file_dev, file_ino, fd_index"
_XID = "host_id, boot_id, assumeNotNull(transfer_id), fd_index"

# How long before a question's --since a RECV is still read for the SENDs it selects:
# a RECV cannot finish before its SEND queued the list, but the two stamps are taken at
# each call's exit and wall clocks step (NTP), so a little room.
RECV_SLACK = "INTERVAL 1 HOUR"

# One row per transfer (a SEND and its RECV, or a SEND alone), the same columns from both
# rules; s_* the sender's side, r_* the receiver's (NULL when undelivered).
_SIDE = ("{p}time AS {q}time, {p}pid AS {q}pid, {p}comm AS {q}comm, {p}exe AS {q}exe, "
         "ifNull({p}container_id, '') AS {q}container, {p}fd AS {q}fd, {p}mntns_id AS {q}mntns, "
         "{p}file_path AS {q}file, "
         "{p}file_verified AS {q}verified, {p}event_id AS {q}event_id, {p}seq AS {q}seq")
_PAIR_COLS = (_SIDE.format(p="s.", q="s_") + ", " + _SIDE.format(p="r.", q="r_")
              + ", s.host AS host, s.host_id AS host_id, s.boot_id AS boot_id, s.file_path AS file, "
              "s.file_type AS type, s.file_dev AS dev, s.file_ino AS ino, s.transfer_id AS transfer_id, "
              "r.event_id IS NOT NULL AS delivered")

_PAIRS = f"""
  -- time is MATERIALIZED: * leaves it out
  s AS {{mat}}(SELECT *, time FROM {TABLE}
        WHERE direction = 'SEND' AND peer_sock_ino IS NOT NULL AND {{pushdown}} {{either}} {{first}}),
  -- PREWHERE: one column decides which rows' other columns are read at all
  rx AS {{mat}}(SELECT *, time FROM {TABLE}
         PREWHERE assumeNotNull(transfer_id) IN (SELECT assumeNotNull(transfer_id) FROM s WHERE transfer_id IS NOT NULL)
         WHERE direction = 'RECV' AND transfer_id IS NOT NULL AND {{host}} AND {{recv_window}}
           AND (host_id, boot_id, assumeNotNull(transfer_id)) IN
               (SELECT host_id, boot_id, assumeNotNull(transfer_id) FROM s WHERE transfer_id IS NOT NULL)),
  exact AS (SELECT {_PAIR_COLS} FROM s INNER JOIN rx AS r
            ON s.host_id = r.host_id AND s.boot_id = r.boot_id
           AND assumeNotNull(s.transfer_id) = assumeNotNull(r.transfer_id) AND s.fd_index = r.fd_index),
  -- the old rule, over the keys of the selected SENDs that have no exact match
  keys AS {{mat}}(SELECT DISTINCT {_SEND_KEY} FROM s
           WHERE transfer_id IS NULL OR ({_XID}) NOT IN (SELECT {_XID} FROM rx)),
  sk AS {{mat}}(SELECT *, time FROM {TABLE} PREWHERE file_ino IN (SELECT file_ino FROM keys)
         WHERE direction = 'SEND' AND peer_sock_ino IS NOT NULL AND {{host}} AND ({_SEND_KEY}) IN keys),
  rk AS {{mat}}(SELECT *, time FROM {TABLE} PREWHERE file_ino IN (SELECT file_ino FROM keys)
         WHERE direction = 'RECV' AND {{host}} AND ({_RECV_KEY}) IN keys),
  so AS (SELECT *, row_number() OVER (PARTITION BY {_SEND_KEY} ORDER BY time_ns, seq) AS k FROM sk
         WHERE transfer_id IS NULL OR ({_XID}) NOT IN (SELECT {_XID} FROM rk WHERE transfer_id IS NOT NULL)),
  ro AS (SELECT *, row_number() OVER (PARTITION BY {_RECV_KEY} ORDER BY time_ns, seq) AS k FROM rk
         WHERE transfer_id IS NULL OR ({_XID}) NOT IN (SELECT {_XID} FROM sk WHERE transfer_id IS NOT NULL)),
  ranked AS (SELECT {_PAIR_COLS} FROM so AS s LEFT JOIN ro AS r
             ON s.host_id = r.host_id AND s.boot_id = r.boot_id AND assumeNotNull(s.peer_sock_ino) = r.sock_ino
            AND s.file_dev = r.file_dev AND s.file_ino = r.file_ino AND s.fd_index = r.fd_index AND s.k = r.k
             WHERE s.event_id IN (SELECT event_id FROM s)),
  pairs AS (SELECT * FROM exact UNION ALL SELECT * FROM ranked)"""

_TRANSFERS = f"""
WITH{_PAIRS}
SELECT
  s_time AS sent, r_time AS received, host,
  s_pid AS sender_pid, s_comm AS sender_comm, s_container AS sender_container, s_fd AS sender_fd,
  r_pid AS receiver_pid, r_comm AS receiver_comm, r_container AS receiver_container,
  r_fd AS receiver_fd, file, type,
  if(delivered, 'delivered', 'undelivered') AS status
FROM pairs
WHERE {{after}}
ORDER BY sent, s_seq, r_time
LIMIT {{{{limit:UInt32}}}}
SETTINGS join_use_nulls = 1{{settings}}
"""

# A transfer between containers or mount namespaces.
_CROSSING = "WHERE delivered AND (s_container != ifNull(r_container, '') OR s_mntns != r_mntns) AND {after}"
_CROSS = _TRANSFERS.replace("WHERE {after}", _CROSSING).replace(
    "r_fd AS receiver_fd, file,",
    "r_fd AS receiver_fd, s_mntns AS sender_mntns, r_mntns AS receiver_mntns, file,",
)

# Every column of a transfer: what `chain` and `graph` build on.
_HOPS = f"""
WITH{_PAIRS}
SELECT * FROM pairs
WHERE {{after}}
ORDER BY s_time, s_seq, r_time
LIMIT {{{{limit:UInt32}}}}
SETTINGS join_use_nulls = 1{{settings}}
"""
_CROSS_HOPS = _HOPS.replace("WHERE {after}", _CROSSING)

_EVENTS = f"""
SELECT time, host, direction, syscall, abi, pid, comm, exe, ifNull(container_id, '') AS container,
       sock_ino, peer_sock_ino, fd, fd_index, fd_count, file_path, file_type
FROM {TABLE}
WHERE {{pushdown}} AND {{after}}
ORDER BY time, seq
LIMIT {{{{limit:UInt32}}}}
"""

_TIMELINE = f"""
SELECT time, direction, pid, comm, fd, file_path, sock_ino, peer_sock_ino
FROM {TABLE}
WHERE {{pushdown}} AND {{after}}
ORDER BY time, seq
LIMIT {{{{limit:UInt32}}}}
"""

# file_verified = false: the file's identity came from the process's memory or fd
# table, not from the kernel's SCM_RIGHTS list, so a racing thread could have
# swapped it (fields.py). Rows stored before schema v3 read as false too.
_UNVERIFIED = f"""
SELECT time, host, direction, syscall, abi, pid, comm, fd, file_path AS file, probe
FROM {TABLE}
WHERE NOT file_verified AND {{pushdown}} AND {{after}}
ORDER BY time, seq
LIMIT {{{{limit:UInt32}}}}
"""

# seq = run << 48 | n (bpf/fdpass.h): n has no holes unless records were lost. A run whose id has
# HANDOVER_RUN_BIT took over from a running collector at a cutover (collector/handover.py): its
# predecessor covered everything before its first record, so it is no restart, and the numbers it
# dropped before the cutover (the predecessor stored those transfers) are no loss.
_GAPS = f"""
WITH
  ev AS (SELECT host, boot_id, bitShiftRight(seq, 48) AS run, bitAnd(seq, 0xFFFFFFFFFFFF) AS n, time
         FROM {TABLE} WHERE {{pushdown}}),
  stepped AS (SELECT host, boot_id, run, n, time,
                     lagInFrame(n, 1, toUInt64(0) - 1) OVER w AS prev_n,
                     lagInFrame(time, 1, time) OVER w AS prev_time
              FROM ev WINDOW w AS (PARTITION BY host, boot_id, run ORDER BY n
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))
SELECT host, boot_id, run, prev_time AS from_time, time AS to_time,
       'records lost (kernel drops, bounds or a broken pipeline)' AS what,
       n - prev_n - 1 AS missing
FROM stepped
WHERE n > prev_n + 1 AND prev_n != toUInt64(0) - 1 AND {{after}}
UNION ALL
SELECT host, boot_id, run, min(time) AS from_time, min(time) AS to_time,
       'records lost at the start of a collector run' AS what, min(n) AS missing
FROM ev GROUP BY host, boot_id, run HAVING min(n) > 0 AND bitAnd(run, {HANDOVER_RUN_BIT}) = 0
UNION ALL
SELECT host, boot_id, run, prev_end AS from_time, start AS to_time,
       'collector restarted: transfers between these times were not watched' AS what, NULL AS missing
FROM (SELECT host, boot_id, run, min(time) AS start,
             lagInFrame(max(time), 1, min(time)) OVER (PARTITION BY host, boot_id ORDER BY min(time)
                                                       ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS prev_end,
             row_number() OVER (PARTITION BY host, boot_id ORDER BY min(time)) AS i
      FROM ev GROUP BY host, boot_id, run)
WHERE i > 1 AND bitAnd(run, {HANDOVER_RUN_BIT}) = 0
ORDER BY host, from_time
LIMIT {{{{limit:UInt32}}}}
"""


_PAIRED = (_TRANSFERS, _CROSS, _HOPS, _CROSS_HOPS)


@dataclass(frozen=True)
class Question:
    name: str
    help: str
    sql: str
    needs: tuple[str, ...] = ()  # options that must be given
    # options applied before pairing/ranking (safe: they select whole pairs)
    pushdown: tuple[str, ...] = ()
    # options applied to the result
    after: tuple[str, ...] = ()


# option -> (SQL fragment with {param}, parameter type). The fragment is the
# only SQL an option contributes; its value is bound as a parameter.
def _frag(prefix: str) -> dict[str, tuple[str, str]]:
    p = prefix
    return {
        # host leads the sort key: a host_id is turned into its names first, so that the key prunes
        "host": (f"({p}host = {{host:String}} OR {p}host IN (SELECT host FROM {TABLE} "
                 "PREWHERE host_id = {host:String} GROUP BY host))", "String"),
        "since": (f"{p}time >= parseDateTime64BestEffort({{since:String}}, 9, 'UTC')", "String"),
        "until": (f"{p}time < parseDateTime64BestEffort({{until:String}}, 9, 'UTC')", "String"),
        "path": (f"{p}file_path LIKE {{path:String}}", "String"),
        "dev": (f"{p}file_dev = {{dev:Int64}}", "Int64"),
        "ino": (f"{p}file_ino = {{ino:Int64}}", "Int64"),
        "pid": (f"{p}pid = {{pid:Int32}}", "Int32"),
        "comm": (f"{p}comm = {{comm:String}}", "String"),
        "exe": (f"{p}exe LIKE {{exe:String}}", "String"),
        "container": (f"startsWith(ifNull({p}container_id, ''), {{container:String}})", "String"),
        # not options of the command line: what fdpass/chain.py asks for
        "hosts": (f"{p}host IN {{hosts:Array(String)}}", "Array(String)"),
        "files": (f"({p}host_id, {p}file_dev, {p}file_ino) IN {{files:Array(Tuple(String, Int64, Int64))}}",
                  "Array(Tuple(String, Int64, Int64))"),
    }


# Process filters on a transfer match either side: who sent it or who received it.
def _either(frag: str) -> str:
    return f"(({frag.replace('{p}', 's_')}) OR ({frag.replace('{p}', 'r_')}))"


_PROCESS_EITHER = {
    "pid": "{p}pid = {pid:Int32}",
    "comm": "{p}comm = {comm:String}",
    "exe": "{p}exe LIKE {exe:String}",
    "container": "startsWith(ifNull({p}container, ''), {container:String})",
}

_FILE_OPTS = ("host", "path", "dev", "ino")
_TIME_OPTS = ("since", "until")

QUESTIONS: dict[str, Question] = {q.name: q for q in (
    Question("transfers", "each SEND joined to its RECV: sender, receiver, file, fds on both sides; "
             "unmatched sends shown as undelivered", _TRANSFERS,
             pushdown=_FILE_OPTS + _TIME_OPTS, after=tuple(_PROCESS_EITHER)),
    Question("cross-container", "transfers whose sender and receiver are in different containers or "
             "mount namespaces", _CROSS, pushdown=_FILE_OPTS + _TIME_OPTS, after=tuple(_PROCESS_EITHER)),
    Question("file", "every event of a file: --path PATTERN (SQL LIKE, %% matches anything) or --dev/--ino",
             _EVENTS, pushdown=_FILE_OPTS + _TIME_OPTS + ("pid", "comm", "exe", "container")),
    Question("process", "every event of a process: --pid, --comm or --exe (LIKE pattern)",
             _EVENTS, pushdown=_FILE_OPTS + _TIME_OPTS + ("pid", "comm", "exe", "container")),
    Question("host", "every event of one host (name or host_id)", _EVENTS, needs=("host",),
             pushdown=_FILE_OPTS + _TIME_OPTS + ("pid", "comm", "exe", "container")),
    Question("timeline", "one host's transfers in time order, compact", _TIMELINE, needs=("host",),
             pushdown=_FILE_OPTS + _TIME_OPTS + ("pid", "comm", "exe", "container")),
    Question("unverified", "events whose file identity rests on process memory or the fd table, not on "
             "the kernel's SCM_RIGHTS list (file_verified false)",
             _UNVERIFIED, pushdown=_FILE_OPTS + _TIME_OPTS + ("pid", "comm", "exe", "container")),
    Question("gaps", "where events are missing: lost records (sequence holes) and collector restarts",
             _GAPS, pushdown=("host",), after=("since", "until")),
)}

OPTION_NAMES = ("host", "since", "until", "path", "dev", "ino", "pid", "comm", "exe", "container")
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def absolute_time(text: str, now: float | None = None) -> str:
    """'2h', '30m', '7d' ago -> ISO UTC; anything else is passed to ClickHouse's best-effort parser."""
    m = _RELATIVE.match(text.strip())
    if not m:
        return text
    ts = (now if now is not None else time.time()) - int(m.group(1)) * _UNITS[m.group(2)]
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def build(name: str, options: dict, limit: int = 1000, materialize: bool = False) -> tuple[str, dict]:
    """(SQL, bound parameters) for a named question and its options.
    materialize: the server runs `WITH x AS MATERIALIZED (...)` (see materialized_ctes)."""
    q = QUESTIONS.get(name)
    if q is None:
        raise UserError(f"unknown question {name!r}; known: {', '.join(QUESTIONS)}")
    return build_question(q, options, limit, materialize)


def materialized_ctes(client) -> bool:
    """Can this ClickHouse compute a CTE once for all its uses (enable_materialized_cte, 2026)?
    The pairing reads its SEND and RECV sides several times; computed once, a one-day question of
    the fleet runs ~4x faster (bench/bench_query.py). Older servers inline every use, as before."""
    rows = client.query("SELECT count() FROM system.settings WHERE name = 'enable_materialized_cte'").result_rows
    return bool(rows[0][0])


# Every column of every transfer (fdpass/chain.py, fdpass/graph.py): not a question of its own.
HOPS = Question("hops", "", _HOPS, pushdown=_FILE_OPTS + _TIME_OPTS + ("hosts", "files"), after=tuple(_PROCESS_EITHER))
CROSS_HOPS = Question("cross-hops", "", _CROSS_HOPS, pushdown=_FILE_OPTS + _TIME_OPTS, after=tuple(_PROCESS_EITHER))


def build_question(q: Question, options: dict, limit: int = 1000, materialize: bool = False) -> tuple[str, dict]:
    name = q.name
    given = {k: v for k, v in options.items() if v is not None}
    for k in q.needs:
        if k not in given:
            raise UserError(f"`fdpass query {name}` needs --{k}")
    unusable = [k for k in given if k not in q.pushdown and k not in q.after]
    if unusable:
        raise UserError(f"`fdpass query {name}` does not take " + ", ".join(f"--{k}" for k in unusable))
    if limit <= 0:
        raise UserError("--limit must be greater than 0")
    params: dict = {"limit": limit}
    for k in ("since", "until"):
        if k in given:
            given[k] = absolute_time(str(given[k]))
    pushdown, after = ["1"], ["1"]
    plain = _frag("")
    for k, v in given.items():
        params[k] = v
        if k in q.pushdown:
            pushdown.append(plain[k][0])
        elif k in _PROCESS_EITHER and q.sql in _PAIRED:
            after.append(_either(_PROCESS_EITHER[k]))
        else:
            after.append(plain[k][0])
    fill = {"pushdown": " AND ".join(pushdown), "after": " AND ".join(after)}
    if q.sql in _PAIRED:
        fill["host"] = " AND ".join(plain[k][0] for k in ("host", "hosts") if k in given) or "1"
        fill["recv_window"] = (f"time >= parseDateTime64BestEffort({{since:String}}, 9, 'UTC') - {RECV_SLACK}"
                               if "since" in given else "1")
        # Every SEND gives at least one row, in SEND order: without a filter on the result,
        # the first `limit` SENDs are all the answer needs.
        fill["first"] = "ORDER BY time_ns, seq, sock_ino LIMIT {limit:UInt32}" if after == ["1"] else ""
        fill["either"] = _either_pushdown([plain[k][0] for k in given if k in _PROCESS_EITHER], fill)
        fill["mat"] = "MATERIALIZED " if materialize else ""
        fill["settings"] = ", enable_materialized_cte = 1" if materialize else ""
    sql = q.sql.format(**fill)
    return sql, params


def _either_pushdown(frags: list[str], fill: dict) -> str:
    """Process filters match either side of a transfer, so they are applied to the pairs; this
    narrows the SENDs read to those that can pass: the SEND matches one of the filters, or a
    RECV that matches one carries its transfer id or its key for the old rule."""
    if not frags:
        return ""
    anyone = "(" + " OR ".join(frags) + ")"
    recvs = (f"FROM {TABLE} WHERE direction = 'RECV' AND {fill['host']} AND {fill['recv_window']} AND {anyone}")
    return (f"AND ({anyone} OR ({_SEND_KEY}) IN (SELECT {_RECV_KEY} {recvs}) "
            f"OR (transfer_id IS NOT NULL AND ({_XID}) IN (SELECT {_XID} {recvs} AND transfer_id IS NOT NULL)))")


QUERY_EPILOG = "questions:\n" + "\n".join(f"  {q.name:<16} {q.help}" for q in QUESTIONS.values()) + """
  chain            every hop one open file made, sender -> receiver, in time order; start from
                   --path/--dev/--ino, a receiver's --pid and --fd, or --event-id; --depth bounds it
  graph            the hand-off graph of transfers (--of transfers|cross-container|chain) as
                   --output FILE.svg|.png|.dot, or - for DOT on stdout (SVG/PNG need Graphviz)

examples:
  fdpass query transfers --path /etc/shadow --since 24h
  fdpass query cross-container --host node-7
  fdpass query process --comm containerd --json
  fdpass query unverified --host node-7 --since 24h
  fdpass query gaps
  fdpass query chain --path /etc/shadow --host node-7
  fdpass query chain --host node-7 --pid 4242 --fd 9      who gave pid 4242 its fd 9, and who gave it to them
  fdpass query graph --since 1d --host node-7 --output handoffs.svg
  fdpass query graph --of chain --path /etc/shadow --output -
  fdpass query "SELECT comm, count() FROM fdpass.events GROUP BY comm ORDER BY 2 DESC"
"""


def add_arguments(parser) -> None:
    """Options of the named questions, on the `fdpass query` parser."""
    g = parser.add_argument_group("options of the named questions (values are bound, never spliced into SQL)")
    g.add_argument("--host", help="host name or host_id")
    g.add_argument("--since", help="from this time: ISO/any date ClickHouse parses, or 30m/2h/7d ago")
    g.add_argument("--until", help="before this time (same forms as --since)")
    g.add_argument("--path", help="file path, SQL LIKE pattern (%% matches anything)")
    g.add_argument("--dev", type=int, help="file device (st_dev)")
    g.add_argument("--ino", type=int, help="file inode")
    g.add_argument("--pid", type=int, help="process id (sender or receiver for transfers)")
    g.add_argument("--comm", help="task name")
    g.add_argument("--exe", help="executable path, LIKE pattern")
    g.add_argument("--container", help="container id or its prefix")
    g.add_argument("--limit", type=int, default=1000, help="at most this many rows (default 1000)")
    c = parser.add_argument_group("options of chain and graph")
    c.add_argument("--event-id", help="chain: start from this event (a SEND or a RECV)")
    c.add_argument("--fd", type=int, help="chain: with --pid, start from the file that process received on this fd "
                                          "(its latest RECV there)")
    c.add_argument("--depth", type=int, default=16, help="chain: follow at most this many hops (default 16)")
    c.add_argument("--output", metavar="FILE", help="graph: FILE.svg, FILE.png, FILE.dot, or - (DOT on stdout)")
    c.add_argument("--of", choices=("transfers", "cross-container", "chain"), default="transfers",
                   help="graph: draw these transfers (default transfers)")
    c.add_argument("--max-nodes", type=int, default=60,
                   help="graph: more processes than this are collapsed by comm and container (default 60)")
    c.add_argument("--max-edges", type=int, default=100, help="graph: draw the busiest edges only (default 100)")


def from_args(what: str, args, client=None) -> tuple[str, dict] | None:
    """(SQL, parameters) if `what` names a question; None if it is SQL (then no question options).
    client: the store's, to ask what it supports (materialized_ctes); None only checks the options."""
    options = {k: getattr(args, k, None) for k in OPTION_NAMES}
    if what in QUESTIONS:
        return build(what, options, args.limit, client is not None and materialized_ctes(client))
    used = [f"--{k}" for k, v in options.items() if v is not None]
    if used:
        if re.fullmatch(r"[a-z-]+", what.strip()):
            raise UserError(f"unknown question {what!r}; known: {', '.join(QUESTIONS)}")
        raise UserError(f"{', '.join(used)} apply to named questions, not to SQL; put conditions in the SQL")
    return None
