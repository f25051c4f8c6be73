"""The in-kernel backend and the tracepoint backend report the same events.

Both collectors run at once over the same workloads (each loads its own
programs; the kernel runs both), and every event of the workloads' sockets must
be the same on both except the fields that name the probe load (probe, seq,
event_id, time_ns and the transfer_id numbers, whose pairing is compared
instead) and file_verified, which the kernel backend always has true while the
tracepoint backend cannot verify some calls by design (docs/kernel.md,
"Verification"). Runs where the kernel backend loads (scripts/vm-test boots
such a kernel); elsewhere it skips.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests import workloads as W
from tests.fixtures_bpf import LiveCollector, require_kernel_backend

pytestmark = [pytest.mark.bpf, pytest.mark.kernel_backend]

IGNORED = {"probe", "seq", "event_id", "time_ns", "transfer_id", "file_verified"}


@pytest.fixture(scope="module")
def both(live):
    """The session's collector when it runs the kernel backend (as in
    scripts/vm-test: a load costs ~30 s under TCG), else one of its own."""
    require_kernel_backend()
    own = live.collector.probes.backend != "kernel"
    kernel = LiveCollector(backend="kernel") if own else live
    tracepoint = LiveCollector(backend="tracepoint")
    assert (kernel.collector.probes.backend, tracepoint.collector.probes.backend) == ("kernel", "tracepoint")
    yield kernel, tracepoint
    if own:
        kernel.close()
    tracepoint.close()


def keyed(events: list[dict]) -> list[tuple[tuple, dict]]:
    """Each event under (direction, socket, message, fd position, how many
    times that came before): one socket carries several transfers, and
    MSG_PEEK installs a list twice. Counted in the backend's own order (seq)."""
    seen: dict[tuple, int] = {}
    out = []
    for e in sorted(events, key=lambda e: e["seq"]):
        base = (e["direction"], e["sock_ino"], e["msg_index"], e["fd_index"])
        seen[base] = seen.get(base, -1) + 1
        out.append((base + (seen[base],), e))
    return out


def comparable(events: list[dict]) -> dict[tuple, dict]:
    return {k: {f: v for f, v in e.items() if f not in IGNORED} for k, e in keyed(events)}


def pairing(events: list[dict], keys: set) -> set[frozenset]:
    """Which events share a transfer_id, among keys."""
    groups: dict[int, set] = {}
    for k, e in keyed(events):
        if e["transfer_id"] is not None and k in keys:
            groups.setdefault(e["transfer_id"], set()).add(k)
    return {frozenset(g) for g in groups.values()}


def workload(cprogs) -> tuple[set[int], int]:
    """Transfers of every kind the capture tests use; returns their socket inodes
    and how many events they make (one per fd per side)."""
    socks = set()
    expect = 0
    fds = [os.open("/etc/passwd", os.O_RDONLY), *os.pipe(), os.memfd_create("agree"), os.eventfd(0)]
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
            a, b = socket.socketpair(socket.AF_UNIX, kind)
            socket.send_fds(a, [b"x"], fds[:1])
            socket.send_fds(a, [b"y"], fds)
            for n in (1, len(fds)):
                _m, got, _f, _ = socket.recv_fds(b, 16, n + 2)
                for fd in got:
                    os.close(fd)
                expect += 2 * n
            socks |= {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
            a.close()
            b.close()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        assert W.sendmmsg(a, [(b"m0", W.rights(fds[:1])), (b"m1", W.rights(fds[1:3]))]) == 2
        for _data, got, _flags in W.recvmmsg(b, 4, flags=socket.MSG_DONTWAIT):
            for fd in got:
                os.close(fd)
            expect += 2 * len(got)
        socks |= {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
        a.close()
        b.close()
    finally:
        for fd in fds:
            os.close(fd)
    for prog, mode in (("xfer32", "sendmsg"), ("xfer32", "mmsg"), ("xfer64", "int80"),
                       ("uring", "inline"), ("uring", "async"), ("peek", None)):
        truth = cprogs.run(prog, *([mode] if mode else []), *(["/etc/shadow"] if prog != "peek" else []))
        socks |= {truth["send_sock_ino"], truth["recv_sock_ino"]}
        expect += sum(len(m["sent"]) + len(m["received"]) for m in truth["messages"])
    return socks, expect


def test_same_workload_same_events(both, cprogs):
    kernel, tracepoint = both
    socks, expect = workload(cprogs)
    k = kernel.wait(lambda e: e["sock_ino"] in socks, expect, timeout=30, settle=1.0)
    t = tracepoint.wait(lambda e: e["sock_ino"] in socks, expect, timeout=30, settle=1.0)
    assert (len(k), len(t)) == (expect, expect), (k, t)
    ka, ta = comparable(k), comparable(t)
    assert len(ka) == len(k) and len(ta) == len(t), "two events of one backend share a key"
    assert set(ka) == set(ta), (f"only kernel: {sorted(set(ka) - set(ta))}; "
                                f"only tracepoint: {sorted(set(ta) - set(ka))}")
    # exe is read from /proc by each collector when the record arrives: a short
    # workload may have exited by then for one of them (null), not a backend matter
    differ = {kk: {f: (ka[kk][f], ta[kk][f]) for f in ka[kk] if ka[kk][f] != ta[kk][f]
                   and not (f == "exe" and None in (ka[kk][f], ta[kk][f]))} for kk in ka}
    differ = {kk: d for kk, d in differ.items() if d}
    assert not differ, differ
    assert all(e["file_verified"] is True for e in k)
    assert {e["probe"] for e in k} == {"fentry"}
    # transfer ids pair the same events wherever the tracepoint backend gives them
    both_keys = {k for k, e in keyed(t) if e["transfer_id"] is not None}
    assert pairing(k, both_keys) == pairing(t, both_keys)
