"""`fdpass query chain` and `fdpass query graph` on real captures (a 3-hop chain whose last
receiver is in its own mount namespace; one sender forking a file to three receivers) and on
synthetic transfers that must not join (another host, another boot, a reused inode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdpass import chain
from fdpass.schemas.synthetic import make_event
from tests.fixtures_clickhouse import FDPASS, ROOT

pytestmark = pytest.mark.bpf

WORKLOAD = Path(__file__).with_name("chain_workload.py")
T0 = 1_795_000_000_000_000_000
SEC = 1_000_000_000
BOOT2 = "99999999-9d3a-4c55-8e61-0a2b3c4d5e6f"


def syn(n, direction, *, host="syn-1", boot=None, pid, fd, ino, path, t, sock, peer, xid):
    e = make_event(n)
    e.update(direction=direction, syscall="SENDMSG" if direction == "SEND" else "RECVMSG", pid=pid, tid=pid,
             comm=f"p{pid}", host=host, host_id=host * 4, sock_ino=sock, peer_sock_ino=peer, fd=fd, fd_index=0,
             fd_count=1, file_ino=ino, file_dev=2049, file_path=path, time_ns=T0 + t * SEC, seq=n,
             event_id=f"syn:{n}", file_verified=True, transfer_id=xid, container_id=None)
    if boot:
        e["boot_id"] = boot
    return e


def synthetic() -> list[dict]:
    """p10 -> p20 -> p30 on syn-1, then look-alikes that must not continue it: p20 on another host,
    p20 on another boot of syn-1, and p20 sending a new file that reused inode 500 (other fd, other
    path). And on syn-9 a lost RECV: ids pair exactly where rank order would shift."""
    k = dict(ino=500, path="/tmp/a")
    out = [
        syn(1, "SEND", pid=10, fd=3, t=0, sock=1, peer=2, xid=1, **k),
        syn(2, "RECV", pid=20, fd=7, t=1, sock=2, peer=1, xid=1, **k),
        syn(3, "SEND", pid=20, fd=7, t=10, sock=3, peer=4, xid=2, **k),
        syn(4, "RECV", pid=30, fd=4, t=11, sock=4, peer=3, xid=2, **k),
        syn(5, "SEND", host="syn-2", pid=20, fd=7, t=20, sock=3, peer=4, xid=3, **k),
        syn(6, "RECV", host="syn-2", pid=40, fd=4, t=21, sock=4, peer=3, xid=3, **k),
        syn(7, "SEND", boot=BOOT2, pid=20, fd=7, t=30, sock=3, peer=4, xid=1, **k),
        syn(8, "RECV", boot=BOOT2, pid=50, fd=4, t=31, sock=4, peer=3, xid=1, **k),
        syn(9, "SEND", pid=20, fd=9, t=40, sock=5, peer=6, xid=4, ino=500, path="/tmp/b-new"),
        syn(10, "RECV", pid=60, fd=5, t=41, sock=6, peer=5, xid=4, ino=500, path="/tmp/b-new"),
    ]
    k = dict(host="syn-9", ino=900, path="/tmp/twice", sock=1, peer=2)
    out += [syn(11, "SEND", pid=70, fd=3, t=0, xid=11, **k), syn(13, "SEND", pid=70, fd=3, t=5, xid=12, **k),
            syn(14, "RECV", pid=80, fd=8, t=6, xid=12, **{**k, "sock": 2, "peer": 1})]  # RECV of xid 11 lost
    return out


def fdpass(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FDPASS, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def rows(p: subprocess.CompletedProcess) -> list[dict]:
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


@pytest.fixture(scope="module")
def captured(live, tmp_path_factory):
    """The workload's events, caught by the real probes, in a closed chDB store (+ synthetic rows)."""
    from fdpass.schemas import avro, codec
    from fdpass.schemas.clickhouse import ensure_schema
    from fdpass.sinks import conversion
    from fdpass.sinks.store import open_store

    d = tmp_path_factory.mktemp("chain")
    (d / "secret").write_text("hunter2\n")
    (d / "shared").write_text("shared\n")
    p = subprocess.run([sys.executable, str(WORKLOAD), str(d / "secret"), str(d / "shared")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    roles = json.loads(p.stdout)
    assert all("error" not in v for v in roles.values()), roles
    pids = {v["pid"] for v in roles.values()}
    events = live.wait(lambda e: e["pid"] in pids, 12, timeout=20)
    assert len(events) == 12, [(e["comm"], e["direction"]) for e in events]
    store = open_store(f"chdb://{d}/store")
    client = store.client()
    ensure_schema(client)
    client.raw_insert("fdpass.events", insert_block=conversion.avro_container(
        avro.CURRENT_VERSION, [codec.encode(e) for e in events + synthetic()]), fmt="Avro")
    store.close()
    return {"dsn": f"chdb://{d}/store", "roles": roles, "dir": d, "events": events}


def test_real_three_hop_chain_into_another_mount_namespace(captured):
    r = captured["roles"]
    hops = rows(fdpass("query", "chain", "--clickhouse", captured["dsn"], "--path", str(captured["dir"] / "secret"),
                       "--json"))
    assert [(h["depth"], h["sender_comm"], h["receiver_comm"], h["sender_pid"], h["receiver_pid"]) for h in hops] == [
        (1, "hop-a", "hop-b", r["hop-a"]["pid"], r["hop-b"]["pid"]),
        (2, "hop-b", "hop-c", r["hop-b"]["pid"], r["hop-c"]["pid"]),
        (3, "hop-c", "hop-d", r["hop-c"]["pid"], r["hop-d"]["pid"]),
    ]
    assert {h["chain"] for h in hops} == {1} and all(h["status"] == "delivered" for h in hops)
    assert hops[2]["receiver_mntns"] == r["hop-d"]["mntns"] != hops[2]["sender_mntns"] == r["hop-c"]["mntns"]
    # each hop sends on the fd the previous one received
    assert hops[0]["receiver_fd"] == hops[1]["sender_fd"] and hops[1]["receiver_fd"] == hops[2]["sender_fd"]
    assert hops[2]["note"].startswith("end")
    # the same chain from its last receiver's fd, and from an event id
    d = r["hop-d"]
    back = rows(fdpass("query", "chain", "--clickhouse", captured["dsn"], "--pid", str(d["pid"]),
                       "--fd", str(hops[2]["receiver_fd"]), "--json"))
    assert [(h["sender_comm"], h["receiver_comm"]) for h in back] == [("hop-a", "hop-b"), ("hop-b", "hop-c"),
                                                                      ("hop-c", "hop-d")]
    recv_b = next(e for e in captured["events"] if e["comm"] == "hop-b" and e["direction"] == "RECV")
    by_id = rows(fdpass("query", "chain", "--clickhouse", captured["dsn"], "--event-id", recv_b["event_id"],
                        "--json", "--depth", "2"))
    assert [(h["depth"], h["sender_comm"]) for h in by_id] == [(1, "hop-a"), (2, "hop-b")]
    assert "depth limit 2 reached" in by_id[1]["note"]


def test_real_fork_one_sender_three_receivers(captured):
    hops = rows(fdpass("query", "chain", "--clickhouse", captured["dsn"], "--path", str(captured["dir"] / "shared"),
                       "--json"))
    assert sorted((h["depth"], h["sender_comm"], h["receiver_comm"]) for h in hops) == [
        (1, "fork-src", "fork-1"), (1, "fork-src", "fork-2"), (1, "fork-src", "fork-3")]
    assert len({h["chain"] for h in hops}) == 1


def test_graph_dot_and_svg_of_real_transfers(captured, tmp_path):
    p = fdpass("query", "graph", "--clickhouse", captured["dsn"], "--path", str(captured["dir"]) + "/%",
               "--output", "-")
    assert p.returncode == 0, p.stderr
    dot = p.stdout
    assert dot.startswith("digraph fdpass {") and dot.rstrip().endswith("}")
    nodes = {line.split()[0]: line for line in dot.splitlines() if "[label=" in line and "->" not in line}
    edges = [line.split()[:3] for line in dot.splitlines() if " -> " in line]
    labels = {n: next(r for r in captured["roles"] if f'"{r}\\npid' in line) for n, line in nodes.items()}
    assert sorted((labels[a], labels[b]) for a, _, b in edges) == [
        ("fork-src", "fork-1"), ("fork-src", "fork-2"), ("fork-src", "fork-3"),
        ("hop-a", "hop-b"), ("hop-b", "hop-c"), ("hop-c", "hop-d")]
    svg = tmp_path / "handoffs.svg"
    p = fdpass("query", "graph", "--of", "chain", "--clickhouse", captured["dsn"],
               "--path", str(captured["dir"] / "secret"), "--output", str(svg))
    assert p.returncode == 0, p.stderr
    text = svg.read_text()
    assert "<svg" in text and text.count('class="edge"') == 3 and "hop&#45;d" in text  # dot escapes -


def test_synthetic_chains_do_not_cross_hosts_boots_or_reused_inodes(captured):
    last = next(e for e in synthetic() if e["event_id"] == "syn:4")
    hops = rows(fdpass("query", "chain", "--clickhouse", captured["dsn"], "--event-id", last["event_id"], "--json"))
    assert [(h["depth"], h["sender_pid"], h["receiver_pid"]) for h in hops] == [(1, 10, 20), (2, 20, 30)]
    # seq 5..8 of syn-1's boot are not in the store: the chain may go on where the collector was blind
    assert hops[1]["note"].startswith("end, but the collector missed events after it (records lost"), hops[1]
    for start in ("syn:6", "syn:8", "syn:10"):  # each a chain of its own, one hop
        hops = rows(fdpass("query", "chain", "--clickhouse", captured["dsn"], "--event-id", start, "--json"))
        assert [(h["depth"], h["sender_pid"]) for h in hops] == [(1, 20)], start


def test_transfer_ids_pair_exactly_where_ranks_would_shift(captured):
    p = fdpass("query", "transfers", "--clickhouse", captured["dsn"], "--host", "syn-9", "--json")
    assert [(r["sender_fd"], r["receiver_fd"], r["status"]) for r in rows(p)] == [
        (3, None, "undelivered"), (3, 8, "delivered")]


def test_chain_and_graph_usage_errors(captured, tmp_path):
    p = fdpass("query", "chain", "--clickhouse", captured["dsn"])
    assert p.returncode != 0 and "needs a starting point" in p.stderr and "Traceback" not in p.stderr
    p = fdpass("query", "chain", "--clickhouse", captured["dsn"], "--fd", "3")
    assert "--fd needs --pid" in p.stderr
    p = fdpass("query", "graph", "--clickhouse", captured["dsn"], "--output", str(tmp_path / "x.jpg"))
    assert "name a .svg, .png or .dot" in p.stderr
    p = fdpass("query", "transfers", "--clickhouse", captured["dsn"], "--fd", "3")
    assert "options of chain and graph" in p.stderr


def test_continues_rule():
    a = dict(delivered=True, host_id="h", boot_id="b", dev=1, ino=2, r_pid=5, r_time=1, r_fd=7, r_file="/a")
    b = dict(host_id="h", boot_id="b", dev=1, ino=2, s_pid=5, s_time=2, s_fd=7, s_file="/a")
    assert chain.continues(a, b)
    assert chain.continues(a, b | {"s_fd": 9})  # a dup: the path still names it
    assert not chain.continues(a, b | {"s_fd": 9, "s_file": "/new"})  # inode reused by another file
    assert not chain.continues(a, b | {"s_time": 0})  # sent before it was received
    assert not chain.continues(a, b | {"boot_id": "other"})
    assert not chain.continues(a | {"delivered": False}, b)


def test_graph_collapses_large_graphs():
    from fdpass import graph

    many = [dict(delivered=True, host="h", s_comm="worker", s_pid=i, s_container="", r_comm="broker", r_pid=1,
                 r_container="", s_file=f"/f{i % 3}") for i in range(100)]
    dot, remarks = graph.build_dot(many, max_nodes=10)
    assert "collapsed" in remarks[0] and dot.count(" -> ") == 1 and "x100" in dot and "+2 more files" in dot
    assert os.linesep not in remarks[0]
