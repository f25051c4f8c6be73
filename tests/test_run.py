"""`fdpass run`: real probes into an embedded ClickHouse store, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.fixtures_bpf import FDPASS, require_bpf, spawn_attached

pytestmark = pytest.mark.bpf


def start_run(store, *extra):
    return spawn_attached("run", "--store", str(store), *extra)


def query(store, sql, *extra):
    return subprocess.run(FDPASS + ["query", "--clickhouse", f"chdb://{store}", *extra, sql],
                          capture_output=True, text=True, timeout=120)


def test_run_stores_every_transfer_and_query_reads_them(tmp_path):
    require_bpf()
    from tests.test_metrics_logs import free_port, scrape

    store = tmp_path / "store"
    port = free_port()
    p = start_run(store, "--metrics", f"127.0.0.1:{port}")
    a, b = socket.socketpair()
    n = 30
    try:
        before = scrape(port)
        with open("/etc/passwd") as f:
            for _ in range(n):
                socket.send_fds(a, [b"x"], [f.fileno()])
                for fd in socket.recv_fds(b, 4, 2)[1]:
                    os.close(fd)
        sock = os.fstat(a.fileno()).st_ino
        # while run holds the store, query says so clearly
        held = query(store, "SELECT 1")
        assert held.returncode != 0 and "in use" in held.stderr and "Traceback" not in held.stderr
        time.sleep(2.0)  # past one --batch-age: the rows are stored
        after = scrape(port)
        sent = 'fdpass_run_events_total{direction="SEND"}'
        assert after[sent] - before[sent] >= n
        assert after["fdpass_run_stored_total"] - before["fdpass_run_stored_total"] >= 2 * n
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        a.close()
        b.close()
    assert p.returncode == 0, err
    assert "stopped;" in err
    assert counts_by_direction(store, sock) == [("SEND", n, n), ("RECV", n, n)]


def counts_by_direction(store, sock: int) -> list[tuple[str, int, int]]:
    """(direction, events, distinct event ids) of the transfers over one socket, read from a store."""
    r = query(store, f"SELECT direction, count(), uniqExact(event_id) FROM fdpass.events "
                     f"WHERE sock_ino = {sock} OR peer_sock_ino = {sock} GROUP BY direction ORDER BY direction", "--csv")
    assert r.returncode == 0, r.stderr
    rows = [line.split(",") for line in r.stdout.strip().splitlines()[1:]]
    return [(d.strip('"'), int(c), int(u)) for d, c, u in rows]


def _run_with_transfers(store, n: int) -> int:
    """One `fdpass run` into `store` while n transfers are made; returns the sending socket's inode."""
    p = start_run(store)
    a, b = socket.socketpair()
    try:
        with open("/etc/passwd") as f:
            for _ in range(n):
                socket.send_fds(a, [b"x"], [f.fileno()])
                for fd in socket.recv_fds(b, 4, 2)[1]:
                    os.close(fd)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        return os.fstat(a.fileno()).st_ino
    finally:
        if p.poll() is None:
            p.kill()
        a.close()
        b.close()


def test_a_second_run_into_the_same_store_keeps_both_runs_rows(tmp_path):
    """Each run's first batch is batch 0 of its own insert-token namespace: were the tokens
    shared between runs, ClickHouse would drop the second run's first batch as a repeat."""
    require_bpf()
    store = tmp_path / "store"
    socks = [_run_with_transfers(store, 7) for _ in range(2)]
    r = query(store, "SELECT sock_ino, count() FROM fdpass.events WHERE sock_ino IN ({}) "
                     "GROUP BY sock_ino ORDER BY sock_ino".format(",".join(map(str, socks))), "--csv")
    assert r.returncode == 0, r.stderr
    counts = {int(i): int(c) for i, c in (line.split(",") for line in r.stdout.strip().splitlines()[1:])}
    assert counts == {s: 7 for s in socks}  # the SENDs of each run


def test_run_bad_store_is_one_clear_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run(FDPASS + ["run", "--store", str(f / "sub"), "--duration", "1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "--store" in r.stderr and "Traceback" not in r.stderr


def test_run_gives_chdb_the_lean_allocator_and_a_users_own_wins(tmp_path):
    """The embedded store's jemalloc runs with one arena and a 100 ms decay (what keeps `run` under its
    RSS target, docs/architecture.md "Memory"), read back from the engine; a JE_MALLOC_CONF the user
    set is left as it is."""
    require_bpf()
    from fdpass.sinks.store import LEAN_MALLOC_CONF

    assert "narenas:1" in LEAN_MALLOC_CONF and "dirty_decay_ms:100" in LEAN_MALLOC_CONF
    env = {k: v for k, v in os.environ.items() if k != "JE_MALLOC_CONF"}
    for own, want in ((None, "'narenas': '1', 'percpu_arena': 'disabled', 'dirty_decay_ms': '100'"),
                      ("dirty_decay_ms:0", "'dirty_decay_ms': '0'")):
        r = subprocess.run(FDPASS + ["run", "-v", "--store", str(tmp_path / "store"), "--duration", "1"],
                           capture_output=True, text=True, timeout=120,
                           env=env if own is None else {**env, "JE_MALLOC_CONF": own})
        assert r.returncode == 0, r.stderr
        line = next((x for x in r.stderr.splitlines() if "chDB allocator" in x), "")
        assert want in line, r.stderr


RECEIVER = r"""
import ctypes, os, socket, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS: a mount namespace of its own
    raise OSError(ctypes.get_errno(), "unshare")
s = socket.socket(fileno=int(sys.argv[1]))
print(os.getpid(), os.stat("/proc/self/ns/mnt").st_ino, flush=True)
_, fds, _, _ = socket.recv_fds(s, 16, 8)
print(" ".join(map(str, fds)), flush=True)
sys.stdin.readline()
"""


def test_run_then_transfers_and_cross_container_show_both_ends(tmp_path):
    """Known transfers between this process and a child in a new mount
    namespace: `query transfers` and `query cross-container` return exactly those."""
    require_bpf()
    store = tmp_path / "store"
    p = start_run(store)
    a, b = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(b.fileno())], pass_fds=[b.fileno()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    files = [os.open("/etc/passwd", os.O_RDONLY), os.open(str(tmp_path), os.O_RDONLY), os.memfd_create("handoff")]
    try:
        child_pid, child_ns = (int(x) for x in child.stdout.readline().split())
        socket.send_fds(a, [b"x"], files)
        received = [int(x) for x in child.stdout.readline().split()]
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(10)
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
        for fd in files:
            os.close(fd)
        a.close()
        b.close()
    assert child_ns != os.stat("/proc/self/ns/mnt").st_ino
    want = [(os.getpid(), fd, child_pid, new) for fd, new in zip(files, received)]
    for question in ("transfers", "cross-container"):
        r = query(store, question, "--pid", str(child_pid), "--json")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        got = [(x["sender_pid"], x["sender_fd"], x["receiver_pid"], x["receiver_fd"]) for x in rows]
        assert got == want, (question, rows)
        if question == "transfers":
            assert {x["status"] for x in rows} == {"delivered"}
        else:
            assert {x["receiver_mntns"] for x in rows} == {child_ns}
            assert {x["sender_mntns"] for x in rows} == {os.stat("/proc/self/ns/mnt").st_ino}
