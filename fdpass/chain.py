"""`fdpass query chain`: every hop one open file made, from a starting point.

A hop is a transfer (fdpass/questions.py pairs each SEND with its RECV). A
hop continues an earlier one when the process that received the file sends
the same file onward later: same host and boot, same (file_dev, file_ino),
the receiver's pid is the sender's pid, the send comes after the receive,
and the sender names the file by the fd it received it on or by the path it
saw it under. That last condition keeps a reused inode number (the file was
closed and deleted, a new file got its inode) from joining two chains; a
chain never crosses hosts or boots because both are part of the file's key.
docs/architecture.md, "Chains and graphs", states the rule and its limits.

The store is asked once per file key (host, boot, dev, ino): every transfer
of that file on that boot; the chains are assembled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fdpass import defaults
from fdpass.errors import UserError

TABLE = defaults.EVENTS_TABLE
MAX_FILES = 20  # file keys one `chain` question follows
MAX_TRANSFERS = 200_000  # transfers of one file key read from the store

COLUMNS = ("chain", "depth", "sent", "received", "host", "sender_pid", "sender_comm", "sender_fd",
           "sender_container", "sender_mntns", "receiver_pid", "receiver_comm", "receiver_fd",
           "receiver_container", "receiver_mntns", "file", "status", "note")


@dataclass
class Hop:
    row: dict
    parent: "Hop | None" = None
    children: list = field(default_factory=list)
    depth: int = 1

    def __getitem__(self, k):
        return self.row[k]


def continues(prev: dict, nxt: dict) -> bool:
    """Does transfer `nxt` pass on the file that transfer `prev` delivered? (module docstring)"""
    return (prev["delivered"] and prev["host_id"] == nxt["host_id"] and prev["boot_id"] == nxt["boot_id"]
            and (prev["dev"], prev["ino"]) == (nxt["dev"], nxt["ino"]) and prev["r_pid"] == nxt["s_pid"]
            and prev["r_time"] <= nxt["s_time"]
            and (prev["r_fd"] == nxt["s_fd"] or prev["r_file"] == nxt["s_file"]))


def link(rows: list[dict]) -> list[Hop]:
    """Hops in send order, each tied to the latest earlier hop it continues."""
    hops = [Hop(r) for r in sorted(rows, key=lambda r: (r["s_time"], r["s_seq"]))]
    by_receiver: dict[tuple, list[Hop]] = {}
    for h in hops:
        cands = by_receiver.get((h["host_id"], h["boot_id"], h["s_pid"]), [])
        for prev in reversed(cands):
            if continues(prev.row, h.row):
                h.parent = prev
                h.depth = prev.depth + 1
                prev.children.append(h)
                break
        if h["delivered"]:
            by_receiver.setdefault((h["host_id"], h["boot_id"], h["r_pid"]), []).append(h)
    return hops


def root(h: Hop) -> Hop:
    while h.parent is not None:
        h = h.parent
    return h


def tree(top: Hop) -> list[Hop]:
    out, todo = [], [top]
    while todo:
        h = todo.pop()
        out.append(h)
        todo.extend(h.children)
    return sorted(out, key=lambda h: (h["s_time"], h["s_seq"]))


def _note(h: Hop, depth_limit: int, gaps: list[tuple]) -> str:
    notes = []
    if not h["delivered"]:
        notes.append("undelivered: no RECV in the store (still queued, socket closed, or MSG_CTRUNC)")
    if not h["s_verified"] or (h["delivered"] and not h["r_verified"]):
        side = "sender" if not h["s_verified"] else "receiver"
        notes.append(f"unverified ({side}): the file's identity rests on the process, not the kernel's list")
    if h.depth == depth_limit and h.children:
        notes.append(f"depth limit {depth_limit} reached: {len(h.children)} onward hop(s) not shown")
    elif h["delivered"] and not h.children:
        after = [g for g in gaps if g[0] >= h["r_time"]]
        if after:
            notes.append(f"end, but the collector missed events after it ({after[0][1]} at {after[0][0]})")
        else:
            notes.append("end: the receiver did not pass it on")
    return "; ".join(notes)


def rows_of(chains: list[list[Hop]], depth_limit: int, gaps_of) -> list[tuple]:
    out = []
    for i, hops in enumerate(chains, start=1):
        for h in hops:
            if h.depth > depth_limit:
                continue
            out.append((i, h.depth, h["s_time"], h["r_time"], h["host"], h["s_pid"], h["s_comm"], h["s_fd"],
                        h["s_container"], h["s_mntns"], h["r_pid"], h["r_comm"], h["r_fd"], h["r_container"],
                        h["r_mntns"], h["s_file"], "delivered" if h["delivered"] else "undelivered",
                        _note(h, depth_limit, gaps_of(h["host_id"], h["boot_id"]))))
    return out


# --- asking the store ------------------------------------------------------------------

def _query(client, sql: str, params: dict) -> list[dict]:
    r = client.query(sql, parameters=params)
    return [dict(zip(r.column_names, row)) for row in r.result_rows]


def _start_events(client, options: dict, event_id: str | None, fd: int | None) -> list[dict]:
    """The events a chain starts from: one event (--event-id), a receiver's fd (--pid and --fd:
    its latest RECV on that fd), or every SEND of the files --path/--dev/--ino name."""
    from fdpass import questions as Q

    cols = "event_id, direction, host, host_id, boot_id, file_dev, file_ino, pid, fd, time"
    if event_id is not None:
        # An event id starts with its host_id (fields.py): reading the dictionary-encoded host_id
        # column first spares reading every id of the store (10 s -> 0.3 s on 200M events).
        fast = _query(client, f"SELECT {cols} FROM {TABLE} PREWHERE host_id = splitByChar(':', {{e:String}})[1] "
                              "WHERE event_id = {e:String} LIMIT 1", {"e": event_id})
        return fast or _query(client, f"SELECT {cols} FROM {TABLE} WHERE event_id = {{e:String}} LIMIT 1",
                              {"e": event_id})
    plain = Q._frag("")
    where, params = [], {}
    for k in ("host", "since", "until", "path", "dev", "ino", "pid", "comm", "exe", "container"):
        if options.get(k) is not None:
            where.append(plain[k][0])
            params[k] = Q.absolute_time(str(options[k])) if k in ("since", "until") else options[k]
    if fd is not None:
        where += ["direction = 'RECV'", "fd = {fd:Int32}"]
        params["fd"] = fd
        return _query(client, f"SELECT {cols} FROM {TABLE} WHERE {' AND '.join(where)} "
                              "ORDER BY time DESC LIMIT 1", params)
    where.append("direction = 'SEND'")
    return _query(client, f"SELECT {cols} FROM {TABLE} WHERE {' AND '.join(where)} "
                          f"ORDER BY time, seq LIMIT {MAX_FILES * 50}", params)


def _transfers_of(client, starts: list[dict], keys: list[tuple], materialize: bool) -> list[dict]:
    """Every transfer of the files `keys` (host_id, boot_id, dev, ino) name, in one question."""
    from fdpass import questions as Q

    options = {"hosts": sorted({e["host"] for e in starts}),
               "files": sorted({(host_id, dev, ino) for host_id, _, dev, ino in keys})}
    sql, params = Q.build_question(Q.HOPS, options, MAX_TRANSFERS, materialize)
    boots = set(keys)
    return [r for r in _query(client, sql, params) if (r["host_id"], r["boot_id"], r["dev"], r["ino"]) in boots]


def _gaps(client, host_id: str, boot_id: str) -> list[tuple]:
    """(time, what) of the collector's holes and restarts on one boot, oldest first."""
    from fdpass import questions as Q

    sql, params = Q.build("gaps", {"host": host_id}, 1000)
    return sorted((r["from_time"], r["what"]) for r in _query(client, sql, params) if r["boot_id"] == boot_id)


def check_options(options: dict, event_id, fd) -> None:
    given = {k for k, v in options.items() if v is not None}
    if event_id is None and fd is None and not given & {"path", "dev", "ino"}:
        raise UserError("`fdpass query chain` needs a starting point: --path PATTERN, --dev/--ino, "
                        "--pid PID --fd FD (a receiver's fd) or --event-id ID")
    if fd is not None and options.get("pid") is None:
        raise UserError("--fd needs --pid: the process that received the file on that fd")


def find(client, options: dict, *, event_id: str | None = None, fd: int | None = None,
         depth: int = 16) -> tuple[list[list[Hop]], list[str]]:
    """(chains, remarks): each chain a tree of hops in send order."""
    if depth <= 0:
        raise UserError("--depth must be greater than 0")
    check_options(options, event_id, fd)
    starts = _start_events(client, options, event_id, fd)
    remarks = []
    if not starts:
        return [], ["no event matches the starting point"]
    keys = list(dict.fromkeys((e["host_id"], e["boot_id"], e["file_dev"], e["file_ino"]) for e in starts))
    if len(keys) > MAX_FILES:
        remarks.append(f"the starting point names {len(keys)}+ files; following the first {MAX_FILES} "
                       "(narrow it with --host, --since/--until or --dev/--ino)")
        keys = keys[:MAX_FILES]
    from fdpass.questions import materialized_ctes

    materialize = materialized_ctes(client)
    start_ids = {e["event_id"] for e in starts}
    chains: dict[tuple, list[Hop]] = {}  # one chain per first sender: a fork is one chain
    rows = _transfers_of(client, starts, keys, materialize)
    if len(rows) >= MAX_TRANSFERS:
        remarks.append(f"more than {MAX_TRANSFERS} transfers of these files; the first are followed")
    by_file: dict[tuple, list[dict]] = {}
    for r in rows:
        by_file.setdefault((r["host_id"], r["boot_id"], r["dev"], r["ino"]), []).append(r)
    for (host_id, boot_id, dev, ino), file_rows in by_file.items():
        hops = link(file_rows)
        firsts: dict[tuple, list[Hop]] = {}
        for h in hops:
            if h.parent is None:
                firsts.setdefault((host_id, boot_id, dev, ino, h["s_pid"]), []).append(h)
        for h in hops:
            if h["s_event_id"] in start_ids or h["r_event_id"] in start_ids:
                top = root(h)
                key = (host_id, boot_id, dev, ino, top["s_pid"])
                if key not in chains:
                    chains[key] = sorted((x for t in firsts[key] for x in tree(t)),
                                         key=lambda x: (x["s_time"], x["s_seq"]))
    if not chains:
        remarks.append("the starting event was not part of a transfer the store knows")
    if any(h.depth > depth for c in chains.values() for h in c):
        remarks.append(f"depth limit {depth} reached (--depth): deeper hops are not shown")
    return list(chains.values()), remarks


def run(client, options: dict, *, event_id=None, fd=None, depth=16) -> tuple[list[str], list[tuple], list[str]]:
    chains, remarks = find(client, options, event_id=event_id, fd=fd, depth=depth)
    cache: dict = {}

    def gaps_of(host_id, boot_id):
        if (host_id, boot_id) not in cache:
            cache[host_id, boot_id] = _gaps(client, host_id, boot_id)
        return cache[host_id, boot_id]

    return list(COLUMNS), rows_of(chains, depth, gaps_of), remarks
