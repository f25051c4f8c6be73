"""Forensic questions at fleet scale (issue 14): generate a store of N synthetic events in one
INSERT ... SELECT FROM numbers(N), then time each named question, `chain` and `graph`.

    .venv/bin/python bench/bench_query.py --events 20000000 --store /var/tmp/fdpass-bench-20m
    .venv/bin/python bench/bench_query.py --events 200000000 --store /var/tmp/fdpass-bench-200m

The store is made once and reused (--regenerate to make it again). The data: 100 hosts over
30 days, transfers grouped into chains of 5 hops (the file each chain passes on is its own
inode; each receiver passes it on from the fd it received it on); one chain in 1000 (on host-7) passes
/etc/shadow, one sender in 20 is sshd, a third of the receivers sit in a container and another
mount namespace; 2% of the RECVs carry no transfer_id (a receive the probe could not tie to
the kernel's list), so the old pairing rule runs too. transfer_id is what the probe makes: a
run number (1-3) << 48 | a per-host counter, so ids repeat across hosts. Questions run in this process through
the same code as `fdpass query` (its start-up, ~1 s for chDB, is not counted).
Not part of CI.

Recorded 2026-12-03 19:25 UTC on the project's 2-core VM with nothing else running (seconds, one day):
                                              20M     200M
  transfers --host host-7                     0.39    0.43
  transfers (the fleet)                       0.49    1.35
  cross-container                             0.43    0.95
  transfers (no filter, limit 100)            0.48    1.55
  file --path /etc/shadow / process --comm    0.01    0.01-0.02
  transfers --comm sshd                       0.56    1.99
  host / timeline / unverified                <=0.01  <=0.01
  gaps --host host-7                          0.08    0.33
  chain --event-id (5 hops)                   0.40    1.05
  chain --host host-7 --path /etc/shadow      0.34    0.97
  graph --host host-7 / the fleet             0.22 / 0.43   0.24 / 0.95
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

HOSTS = 100
DAYS = 30
HOPS = 5
D0 = "2026-11-01 00:00:00"

# n -> one event; i = n / 2 is the transfer, c = i / HOPS its chain, j = i % HOPS the hop.
GENERATE = """
INSERT INTO fdpass.events (event_id, time_ns, host, host_id, boot_id, kernel, direction, syscall, pid, tid, ppid,
  uid, gid, comm, parent_comm, exe, mntns_id, pidns_id, netns_id, cgroup_id, container_id, sock_fd, sock_ino,
  peer_sock_ino, fd, fd_index, fd_count, file_path, file_ino, file_dev, file_type, file_flags, ret, probe,
  msg_index, seq, abi, file_verified, transfer_id)
SELECT
  concat(host_id, ':', toString(n)) AS event_id,
  toInt64(toUnixTimestamp(toDateTime({d0:String}, 'UTC'))) * 1000000000
    + c * intDiv({span_ns:Int64}, {chains:Int64}) + j * 1000000 + d * 100000 AS time_ns,
  concat('host-', toString(h)) AS host, hex(MD5(host)) AS host_id,
  concat('boot-', toString(h)) AS boot_id, '6.12.0' AS kernel,
  if(d = 0, 'SEND', 'RECV') AS direction, if(d = 0, 'SENDMSG', 'RECVMSG') AS syscall,
  toInt32(1000 + (c % 50000) * 8 + j + d) AS pid, pid AS tid, 1 AS ppid, 0 AS uid, 0 AS gid,
  if(d = 0 AND j = 0 AND c % 20 = 0, 'sshd', concat('worker-', toString(j + d))) AS comm, 'systemd' AS parent_comm,
  concat('/usr/bin/', comm) AS exe,
  if(d = 1 AND c % 3 = 0, 4026532000 + c % 50, 4026531841) AS mntns_id, 4026531836 AS pidns_id,
  4026531840 AS netns_id, 100 + c % 50 AS cgroup_id,
  if(d = 1 AND c % 3 = 0, concat('ctr', toString(c % 50)), NULL) AS container_id,
  3 AS sock_fd, 1000000 + i * 2 + d AS sock_ino, if(d = 0, 1000000 + i * 2 + 1, 1000000 + i * 2) AS peer_sock_ino,
  toInt32(10 + j + d) AS fd, 0 AS fd_index, 1 AS fd_count,
  if(c % 1000 = 7, '/etc/shadow', concat('/memfd:chain-', toString(c), ' (deleted)')) AS file_path,
  toInt64(c) AS file_ino, 2049 AS file_dev, 'REGULAR' AS file_type, 2 AS file_flags, 1 AS ret,
  'tracepoint' AS probe, 0 AS msg_index, toInt64(n) AS seq, 'X86_64' AS abi, true AS file_verified,
  -- as the probe numbers them: RUN_ID << 48 | a per-host, per-run counter
  if(d = 1 AND cityHash64(i) % 50 = 0, NULL,
     toInt64(bitShiftLeft(toUInt64(1 + h % 3), 48) + intDiv(c, {hosts:UInt64}) * {hops:UInt64} + j)) AS transfer_id
FROM (SELECT number AS n, n % 2 AS d, intDiv(n, 2) AS i, intDiv(i, {hops:UInt64}) AS c, i % {hops:UInt64} AS j,
             c % {hosts:UInt64} AS h
      FROM numbers({events:UInt64}))
SETTINGS max_insert_threads = 2, max_threads = 2
"""


def generate(client, events: int) -> float:
    from fdpass.schemas.clickhouse import ensure_schema

    ensure_schema(client)
    chains = max(events // 2 // HOPS, 1)
    t0 = time.monotonic()
    client.command(GENERATE, parameters={"d0": D0, "span_ns": DAYS * 86400 * 10**9, "chains": chains,
                                         "hops": HOPS, "hosts": HOSTS, "events": events})
    client.command("OPTIMIZE TABLE fdpass.events FINAL")
    return time.monotonic() - t0


def timed(fn) -> tuple[float, int]:
    t0 = time.monotonic()
    n = fn()
    return time.monotonic() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000_000,
                    help="events in the generated store (default 20M: ~300 MiB, ~45 s; 200M: ~2.5 GiB, ~20 min)")
    ap.add_argument("--store", default="/var/tmp/fdpass-bench-query",
                    help="chDB store directory; made when missing, reused when there (--events is then ignored: the count is printed)")
    ap.add_argument("--regenerate", action="store_true", help="make the store again even if it is there")
    a = ap.parse_args()

    from fdpass import chain, graph, questions as Q
    from fdpass.sinks.store import open_store

    if a.regenerate and os.path.isdir(a.store):
        shutil.rmtree(a.store)
    fresh = not os.path.isdir(a.store)
    with open_store(f"chdb://{a.store}") as store:
        client = store.client()
        if fresh:
            print(f"generating {a.events:,} events ...", flush=True)
            print(f"  generated in {generate(client, a.events):.1f} s", flush=True)
        total = client.query("SELECT count() FROM fdpass.events").result_rows[0][0]
        size = client.query("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = 'fdpass' "
                            "AND table = 'events' AND active").result_rows[0][0]
        print(f"store {a.store}: {total:,} events, {size / 2**20:.0f} MiB on disk")
        day = {"since": "2026-11-15 00:00:00", "until": "2026-11-16 00:00:00"}
        start = client.query("SELECT event_id FROM fdpass.events WHERE host = 'host-7' AND direction = 'RECV' "
                             "AND fd = 14 AND time >= '2026-11-15' ORDER BY time LIMIT 1").result_rows[0][0]

        materialize = Q.materialized_ctes(client)
        print(f"materialized CTEs: {'yes' if materialize else 'no (this ClickHouse inlines them)'}")

        def ask(name, limit=1000, **opts):
            sql, params = Q.build(name, opts, limit, materialize)
            return lambda: len(client.query(sql, parameters=params).result_rows)

        def chain_of(**kw):
            return lambda: len(chain.run(client, {k: None for k in Q.OPTION_NAMES} | kw.pop("opts", {}), **kw)[1])

        def graph_of(**opts):
            def run():
                sql, params = Q.build_question(Q.HOPS, opts, 1000, materialize)
                r = client.query(sql, parameters=params)
                hops = [dict(zip(r.column_names, row)) for row in r.result_rows]
                graph.build_dot(hops)
                return len(hops)
            return run

        cases = [
            ("transfers --host host-7, one day", ask("transfers", host="host-7", **day)),
            ("transfers, one day (the fleet)", ask("transfers", **day)),
            ("cross-container, one day", ask("cross-container", **day)),
            ("transfers (no filter, limit 100)", ask("transfers", limit=100)),
            ("file --path /etc/shadow, one day", ask("file", path="/etc/shadow", **day)),
            ("process --comm sshd, one day", ask("process", comm="sshd", **day)),
            ("transfers --comm sshd, one day", ask("transfers", comm="sshd", **day)),
            ("host --host host-7, one day", ask("host", host="host-7", **day)),
            ("timeline --host host-7, one day", ask("timeline", host="host-7", **day)),
            ("unverified, one day", ask("unverified", **day)),
            ("gaps --host host-7, one day", ask("gaps", host="host-7", **day)),
            ("chain --event-id (5-hop chain, host-7)", chain_of(event_id=start)),
            ("chain --host host-7 --path /etc/shadow, one day",
             chain_of(opts={"host": "host-7", "path": "/etc/shadow"} | day)),
            ("graph --host host-7, one day", graph_of(host="host-7", **day)),
            ("graph, one day (the fleet, first 1000 transfers)", graph_of(**day)),
        ]
        print(f"{'question':<52} {'seconds':>8} {'rows':>6}")
        for name, fn in cases:
            secs, rows = timed(fn)
            print(f"{name:<52} {secs:8.2f} {rows:6}", flush=True)


if __name__ == "__main__":
    main()
