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
def both():
    require_kernel_backend()
    kernel = LiveCollector(backend="kernel")
    tracepoint = LiveCollector(backend="tracepoint")
    assert (kernel.collector.probes.backend, tracepoint.collector.probes.backend) == ("kernel", "tracepoint")
    yield kernel, tracepoint
    kernel.close()
    tracepoint.close()


def key(e: dict) -> tuple:
    return (e["direction"], e["sock_ino"], e["msg_index"], e["fd_index"])


def comparable(events: list[dict]) -> dict[tuple, dict]:
    return {key(e): {k: v for k, v in e.items() if k not in IGNORED} for e in events}


def pairing(events: list[dict], keys: set) -> set[frozenset]:
    """Which events share a transfer_id, among keys."""
    groups: dict[int, set] = {}
    for e in events:
        if e["transfer_id"] is not None and key(e) in keys:
            groups.setdefault(e["transfer_id"], set()).add(key(e))
    return {frozenset(g) for g in groups.values()}


def workload(cprogs) -> set[int]:
    """Transfers of every kind the capture tests use; returns their socket inodes."""
    socks = set()
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
            socks |= {os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino}
            a.close()
            b.close()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        assert W.sendmmsg(a, [(b"m0", W.rights(fds[:1])), (b"m1", W.rights(fds[1:3]))]) == 2
        for _data, got, _flags in W.recvmmsg(b, 4, flags=socket.MSG_DONTWAIT):
            for fd in got:
                os.close(fd)
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
    return socks


def test_same_workload_same_events(both, cprogs):
    kernel, tracepoint = both
    socks = workload(cprogs)
    k = kernel.wait(lambda e: e["sock_ino"] in socks, 60, timeout=30, settle=1.0)
    t = tracepoint.wait(lambda e: e["sock_ino"] in socks, len(k), timeout=30, settle=1.0)
    assert len(k) >= 60, k
    ka, ta = comparable(k), comparable(t)
    assert len(ka) == len(k) and len(ta) == len(t), "two events of one backend share a key"
    assert set(ka) == set(ta), (f"only kernel: {sorted(set(ka) - set(ta))}; "
                                f"only tracepoint: {sorted(set(ta) - set(ka))}")
    differ = {kk: {f: (ka[kk][f], ta[kk][f]) for f in ka[kk] if ka[kk][f] != ta[kk][f]} for kk in ka}
    differ = {kk: d for kk, d in differ.items() if d}
    assert not differ, differ
    assert all(e["file_verified"] is True for e in k)
    assert {e["probe"] for e in k} == {"fentry"}
    # transfer ids pair the same events wherever the tracepoint backend gives them
    both_keys = {key(e) for e in t if e["transfer_id"] is not None}
    assert pairing(k, both_keys) == pairing(t, both_keys)
