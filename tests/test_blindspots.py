"""Issue 9: transfers the native syscall tracepoints alone miss or misreport.

32-bit programs (compat system calls, socketcall, int $0x80 from a 64-bit
program), io_uring's in-kernel sendmsg/recvmsg, fd numbers another thread
changes while the kernel and the probes look at them, MSG_PEEK; and programs we
did not write (tmux, Python multiprocessing), whose events must come out
file_verified. The ground truth comes from the workloads in tests/c, which
fstat every fd they send and receive (tests/cprogs.py). Root, BTF, bcc, gcc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bpf

SHADOW, PASSWD, NULL = "/etc/shadow", "/etc/passwd", "/dev/null"
FD_SETS = {"1fd": [SHADOW], "3fds": [SHADOW, PASSWD, NULL]}
RACE_COUNT = 2000


def by_seq(events: list[dict]) -> list[dict]:
    return sorted(events, key=lambda e: e["seq"])


def sides(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """SENDs and RECVs, each in the order the kernel recorded them."""
    return (by_seq([e for e in events if e["direction"] == "SEND"]),
            by_seq([e for e in events if e["direction"] == "RECV"]))


def events_of(live, truth: dict, timeout: float = 10) -> list[dict]:
    """Every event on the workload's two sockets, once all the fds of its truth are in."""
    socks = {truth["send_sock_ino"], truth["recv_sock_ino"]}
    want = sum(len(m["sent"]) + len(m["received"]) for m in truth["messages"])
    return live.wait(lambda e: e["sock_ino"] in socks, want, timeout)


def truth_rows(truth: dict, side: str) -> list[tuple]:
    """(msg_index, fd_index, fd_count, fd, ino, dev) of every fd on one side."""
    return [(i, j, len(m[side]), f["fd"], f["ino"], f["dev"])
            for i, m in enumerate(truth["messages"]) for j, f in enumerate(m[side])]


def event_rows(events: list[dict]) -> list[tuple]:
    return sorted((e["msg_index"], e["fd_index"], e["fd_count"], e["fd"], e["file_ino"], e["file_dev"]) for e in events)


def check_exact(events: list[dict], truth: dict, send_syscall: str, recv_syscall: str) -> None:
    """One SEND per sent fd and one RECV per received fd, each exactly as the workload saw it."""
    send, recv = sides(events)
    assert event_rows(send) == truth_rows(truth, "sent"), send
    assert event_rows(recv) == truth_rows(truth, "received"), recv
    s, r = truth["send_sock_ino"], truth["recv_sock_ino"]
    assert {(e["syscall"], e["sock_ino"], e["peer_sock_ino"]) for e in send} == {(send_syscall, s, r)}
    assert {(e["syscall"], e["sock_ino"], e["peer_sock_ino"]) for e in recv} == {(recv_syscall, r, s)}
    assert {e["pid"] for e in events} == {truth["pid"]}


def verified_share(events: list[dict]) -> float:
    return sum(e["file_verified"] is True for e in events) / len(events)


XFER = [  # program, mode, SEND syscall, RECV syscall
    ("xfer32", "sendmsg", "SENDMSG", "RECVMSG"),  # direct compat calls 370/372
    ("xfer32", "mmsg", "SENDMMSG", "RECVMMSG"),  # libc: 345 and recvmmsg_time64 417
    ("xfer32", "recvmmsg64", "SENDMMSG", "RECVMMSG"),
    ("xfer32", "recvmmsg32", "SENDMMSG", "RECVMMSG"),
    ("xfer32", "socketcall", "SENDMSG", "RECVMSG"),
    ("xfer32", "socketcall_mmsg", "SENDMMSG", "RECVMMSG"),
    ("xfer64", "sendmsg", "SENDMSG", "RECVMSG"),  # control: the native calls
    ("xfer64", "mmsg", "SENDMMSG", "RECVMMSG"),
    ("xfer64", "int80", "SENDMSG", "RECVMSG"),  # compat socketcall from a 64-bit program
]


@pytest.mark.parametrize("paths", FD_SETS.values(), ids=FD_SETS.keys())
@pytest.mark.parametrize("prog,mode,send_syscall,recv_syscall", XFER, ids=[f"{p}-{m}" for p, m, *_ in XFER])
def test_compat_entry_points(live, cprogs, prog, mode, send_syscall, recv_syscall, paths):
    """Every way a 32-bit call can pass fds: the compat syscall tables are not
    the native ones the x86_64 tracepoints see, and the control data is laid
    out in 32-bit cmsghdrs."""
    truth = cprogs.run(prog, mode, *paths)
    assert truth["abi"] == ("IA32" if prog == "xfer32" or mode == "int80" else "X86_64")
    events = events_of(live, truth)
    check_exact(events, truth, send_syscall, recv_syscall)
    assert {e["abi"] for e in events} == {truth["abi"]}
    assert {e["tid"] for e in events} == {truth["tid_send"]} == {truth["tid_recv"]}


@pytest.mark.parametrize("paths", FD_SETS.values(), ids=FD_SETS.keys())
@pytest.mark.parametrize("mode", ["inline", "async", "fixed"])
def test_io_uring_sendmsg_recvmsg(live, cprogs, mode, paths):
    """IORING_OP_SENDMSG/RECVMSG make no sendmsg(2)/recvmsg(2) system call; async
    ones run in an io-wq worker thread, still reported as the ring owner's process;
    fixed ones name their sockets by a slot of the ring's registered files."""
    truth = cprogs.run("uring", mode, *paths)
    events = events_of(live, truth)
    check_exact(events, truth, "IO_URING_SENDMSG", "IO_URING_RECVMSG")
    assert all(e["file_verified"] is True for e in events), events


def test_io_uring_send_without_completion_is_counted(live, cprogs):
    """IOSQE_CQE_SKIP_SUCCESS: a successful send posts no CQE, and so fires no
    io_uring_complete. The in-kernel backend (fexit on io_sendmsg) reports it
    exactly; the tracepoint backend cannot see it, and must say so in its
    counts (kernel_uring_unseen), never silently; the RECV is reported."""
    before = live.collector.stats()["kernel_uring_unseen"]
    truth = cprogs.run("uring", "skip", SHADOW)
    if live.collector.probes.backend == "kernel":
        check_exact(events_of(live, truth), truth, "IO_URING_SENDMSG", "IO_URING_RECVMSG")
        return
    recv_only = dict(truth, messages=[dict(m, sent=[]) for m in truth["messages"]])
    events = events_of(live, recv_only)
    send, recv = sides(events)
    assert send == [] and event_rows(recv) == truth_rows(truth, "received"), events
    assert all(e["file_verified"] is True for e in recv), recv
    assert live.collector.stats()["kernel_uring_unseen"] >= before + 1


def test_a_flood_of_parked_io_uring_receives_does_not_evict_a_victims(live, cprogs):
    """An attacker parks more io_uring receives than the probe's table of
    requests in flight holds (16,384), after a victim's receive. The probe may
    refuse the ones it has no room for, counted, but must still report the
    victim's transfer."""
    before = live.collector.stats()["kernel_pending_full"]
    truth = cprogs.run("uringflood", "17000", SHADOW, timeout=120)
    events = events_of(live, truth)
    check_exact(events, truth, "SENDMSG", "IO_URING_RECVMSG")
    if live.collector.probes.backend == "tracepoint":
        assert live.collector.stats()["kernel_pending_full"] > before  # the flood's overflow, counted


def test_io_uring_sendmsg_zc(live, cprogs):
    """The zero-copy sendmsg opcode: exact events where the kernel offers it on
    unix sockets; where it refuses the request (6.18: EOPNOTSUPP), nothing
    moved, so no event may claim a transfer."""
    truth = cprogs.run("uring", "zc", SHADOW)
    if truth.get("unsupported"):
        print(f"IORING_OP_SENDMSG_ZC refused on unix sockets here: {truth['error']}")
        assert live.wait(lambda e: e["sock_ino"] == truth["send_sock_ino"], 1, timeout=1.0) == []
        return
    events = events_of(live, truth)
    check_exact(events, truth, "IO_URING_SENDMSG_ZC", "IO_URING_RECVMSG")
    assert all(e["file_verified"] is True for e in events), events


# Verified share each race must reach, per side. flip and dup2 race the sender
# (the racing-thread workload): >= 90%. In close the receiver often
# takes the skb before the sender's exit probe and before any wakeup (it was
# not asleep), so neither side can snapshot the list for it: those RECVs stay
# honestly unverified (docs/kernel.md). In recvdup the racer really replaces
# received fds (truth["raced"], 0-1000 per run): those RECVs must not verify,
# so the RECV bound counts only the messages it left alone (see the test).
MIN_VERIFIED = {"flip": 0.9, "dup2": 0.9, "close": 0.6, "recvdup": 0.9}


@pytest.mark.parametrize("mode", ["flip", "dup2", "close", "recvdup"])
def test_raced_fd_numbers_are_never_verified_wrong(live, cprogs, mode):
    """A racing thread changes what a passed fd number names (or the number in
    the sender's buffer) between the kernel's use and the probe's look. An event
    may say it could not verify its file; one that says file_verified must name
    the file the kernel really moved, and most must be verified. A RECV's
    transfer_id, when it has one, is its own SEND's."""
    truth = cprogs.run("race", mode, str(RACE_COUNT))
    msgs = truth["messages"]
    assert len(msgs) == RACE_COUNT
    s, r = truth["send_sock_ino"], truth["recv_sock_ino"]
    events = live.wait(lambda e: e["sock_ino"] in (s, r), 2 * RACE_COUNT, timeout=60)
    send, recv = sides(events)
    assert {e["sock_ino"] for e in send} <= {s} and {e["sock_ino"] for e in recv} <= {r}
    assert (len(send), len(recv)) == (RACE_COUNT, RACE_COUNT), \
        f"events lost or extra (the collector's loss counters, host-wide: {live.collector.stats()})"

    wrong = []
    for side, evs in (("SEND", send), ("RECV", recv)):
        for i, (e, m) in enumerate(zip(evs, msgs)):
            moved = m["received"][0]
            if e["file_verified"] and (e["file_ino"], e["file_dev"]) != (moved["ino"], moved["dev"]):
                wrong.append((side, i, e["fd"], e["file_path"], moved))
    share = {side: verified_share(evs) for side, evs in (("SEND", send), ("RECV", recv))}
    said = f"race {mode}: file_verified SEND {share['SEND']:.1%}, RECV {share['RECV']:.1%} of {RACE_COUNT}"
    if "raced" in truth:
        said += f" ({truth['raced']} received fds replaced or closed before the receiver's fstat)"
    print(said)
    assert not wrong, f"{said}; {len(wrong)} verified events name the wrong file, first: {wrong[:5]}"
    assert [e["fd"] for e in recv] == [m["received"][0]["fd"] for m in msgs], said
    if mode != "flip":  # the sender's buffer is never changed
        assert {e["fd"] for e in send} == {msgs[0]["sent"][0]["fd"]}, said
    if mode == "recvdup":
        assert share["SEND"] >= MIN_VERIFIED[mode], said
        untouched = RACE_COUNT - truth["raced"]
        assert sum(e["file_verified"] for e in recv) >= MIN_VERIFIED[mode] * untouched, said
    else:
        assert min(share.values()) >= MIN_VERIFIED[mode], said
    # a stream socket, one sender and one receiver thread: message i is the i-th SEND and the i-th RECV
    crossed = [(i, a["transfer_id"], b["transfer_id"], b["file_verified"]) for i, (a, b) in enumerate(zip(send, recv))
               if None not in (a["transfer_id"], b["transfer_id"]) and a["transfer_id"] != b["transfer_id"]]
    assert not crossed, (f"{said}; {len(crossed)} RECVs carry another transfer_id than their SEND's "
                         f"(message, SEND's, RECV's, RECV file_verified): {crossed[:5]}")


HIDECTL_COUNT = 2000


@pytest.mark.parametrize("side", ["send", "recv"])
def test_a_raced_control_length_never_makes_an_event_lie(live, cprogs, side):
    """msg_controllen is user memory, read by the tracepoint probe at entry and
    by the kernel just after; a thread flipping it between 0 and the real
    length makes the probe see no control data while the kernel moves the fd.
    send: such a hidden sendmsg of B runs beside plain sends of A on the same
    socket; recv: the receiver's length flips. No verified event may name
    another call's file, no RECV may carry another list's transfer_id; and
    every fd moved has its event (the in-kernel backend reads the kernel's
    own copy; the tracepoint backend cannot, and the test says how many it
    missed: docs/kernel.md, "What is not seen")."""
    truth = cprogs.run("hidectl", side, str(HIDECTL_COUNT))
    s, r = truth["send_sock_ino"], truth["recv_sock_ino"]
    moved = [m for m in truth["messages"] if m["received"]]
    key = lambda f: (f["ino"], f["dev"])
    a, b = key(truth["a"]), key(truth["b"])
    plain_sends = HIDECTL_COUNT  # the main thread's sends of A are never raced
    # The plain sends are always reported; once they are in, so is whatever
    # else of the run will be (a backend that misses calls would make a wait
    # for every moved fd run into its timeout).
    live.wait(lambda e: e["sock_ino"] == s and e["tid"] == truth["tid_send"], plain_sends, timeout=30, settle=1.0)
    send, recv = sides(live.matching(lambda e: e["sock_ino"] in (s, r)))
    hidden = [e for e in send if e["tid"] == truth["tid_hider"]]
    plain = [e for e in send if e["tid"] == truth["tid_send"]]
    wrong = [("SEND", e["file_path"]) for e in plain if e["file_verified"] and (e["file_ino"], e["file_dev"]) != a]
    wrong += [("SEND", e["file_path"]) for e in hidden if e["file_verified"] and (e["file_ino"], e["file_dev"]) != b]
    got = {(m["sent"][0]["ino"], key(m["received"][0])) for m in moved}
    assert got <= {(ord("a"), a), (ord("b"), b)}, got
    assert not wrong, f"verified events naming another call's file: {wrong[:5]}"
    by_id = {e["transfer_id"]: e for e in send if e["transfer_id"] is not None}
    # (a RECV whose SEND went unreported may carry an id no SEND has)
    crossed = [(e["transfer_id"], e["file_path"], by_id[e["transfer_id"]]["file_path"]) for e in recv
               if e["transfer_id"] in by_id and
               (by_id[e["transfer_id"]]["file_ino"], by_id[e["transfer_id"]]["file_dev"]) !=
               (e["file_ino"], e["file_dev"])]
    assert not crossed, f"RECVs paired with a SEND of another file: {crossed[:5]}"
    assert len(plain) == plain_sends, f"plain sends reported: {len(plain)} of {plain_sends}"
    sent_unseen = sum(1 for m in moved if m["sent"][0]["ino"] == ord("b")) - len(hidden)
    received_unseen = len(moved) - len(recv)
    said = (f"hidectl {side}: {len(moved)} fds moved; unreported: {sent_unseen} SENDs, {received_unseen} RECVs "
            f"(backend {live.collector.probes.backend})")
    print(said)
    if live.collector.probes.backend == "tracepoint" and (sent_unseen or received_unseen):
        pytest.xfail(said + ": the tracepoint backend sees only the control length the probe read")
    assert (sent_unseen, received_unseen) == (0, 0), said


def test_a_fixed_file_io_uring_send_never_passes_for_a_native_one(live, cprogs):
    """The attacker's mix: while sendmsg(2) passes A on a socket, another thread
    passes B on the same socket through io_uring, naming the socket as a
    registered file (no fd number in the request). A native SEND that took one
    of those lists for its own would say, verified, that it moved B. Every
    verified event must name its own path's file, and every RECV's transfer_id
    must be its own SEND's."""
    count = 1000
    truth = cprogs.run("mixrace", str(count))
    s, r = truth["send_sock_ino"], truth["recv_sock_ino"]
    events = live.wait(lambda e: e["sock_ino"] in (s, r), 4 * count, timeout=60)
    send, recv = sides(events)
    assert (len(send), len(recv)) == (2 * count, 2 * count), \
        f"events lost or extra (the collector's loss counters, host-wide: {live.collector.stats()})"
    native = [e for e in send if e["syscall"] == "SENDMSG"]
    uring = [e for e in send if e["syscall"] == "IO_URING_SENDMSG"]
    assert (len(native), len(uring)) == (count, count)
    key = lambda f: (f["ino"], f["dev"])
    wrong = [("SENDMSG", e["fd"], e["file_path"]) for e in native
             if e["file_verified"] and (e["file_ino"], e["file_dev"]) != key(truth["native_sent"])]
    wrong += [("IO_URING_SENDMSG", e["fd"], e["file_path"]) for e in uring
              if e["file_verified"] and (e["file_ino"], e["file_dev"]) != key(truth["uring_sent"])]
    wrong += [("RECV", i, e["file_path"]) for i, (e, m) in enumerate(zip(recv, truth["messages"]))
              if e["file_verified"] and (e["file_ino"], e["file_dev"]) != key(m["received"][0])]
    said = (f"mixrace: file_verified SENDMSG {verified_share(native):.1%}, IO_URING_SENDMSG "
            f"{verified_share(uring):.1%}, RECV {verified_share(recv):.1%}")
    print(said)
    assert not wrong, f"{said}; {len(wrong)} verified events name another path's file, first: {wrong[:5]}"
    by_id = {}
    for e in send:
        if e["transfer_id"] is not None:
            by_id.setdefault(e["transfer_id"], []).append(e)
    crossed = [(e["transfer_id"], e["file_path"], [x["file_path"] for x in by_id.get(e["transfer_id"], [])])
               for e in recv if e["transfer_id"] is not None and
               [(x["file_ino"], x["file_dev"]) for x in by_id.get(e["transfer_id"], [])] not in
               ([], [(e["file_ino"], e["file_dev"])])]
    assert not crossed, f"{said}; RECVs paired with a SEND of another file: {crossed[:5]}"


def test_msg_peek_installs_a_second_fd(live, cprogs):
    """recvmsg(MSG_PEEK) installs fds without consuming the message: the next
    recvmsg installs new ones. Two RECVs of one transfer."""
    truth = cprogs.run("peek")
    events = events_of(live, truth)
    send, recv = sides(events)
    msg = truth["messages"][0]
    assert [e["fd"] for e in send] == [msg["sent"][0]["fd"]]
    assert [e["fd"] for e in recv] == [f["fd"] for f in msg["received"]]
    assert {(e["file_ino"], e["file_dev"]) for e in events} == {(msg["sent"][0]["ino"], msg["sent"][0]["dev"])}
    ids = {e["transfer_id"] for e in events}
    assert len(ids) == 1 and None not in ids, events


def assert_mostly_verified(events: list[dict], what: str) -> None:
    share = verified_share(events)
    said = f"{what}: file_verified {share:.1%} of {len(events)} events"
    print(said)
    assert share >= 0.95, said + ": " + repr([e for e in events if not e["file_verified"]][:5])


def test_tmux_events_are_verified(live, tmp_path):
    """A workload we did not write: nothing races there, so its events must verify."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is not installed (scripts/setup installs it)")
    base = [tmux, "-L", "fdpass-test"]
    env = dict(os.environ, TMUX="", TERM="xterm")
    stdin_file = tmp_path / "client-stdin"
    stdin_file.write_text("")
    subprocess.run(base + ["kill-server"], capture_output=True)
    try:
        with open(stdin_file) as stdin:
            client = subprocess.Popen(base + ["new-session", "-d", "sleep 30"], stdin=stdin, env=env)
            assert client.wait(20) == 0
            ask = subprocess.Popen(base + ["display-message", "-p", "#{pid}"], stdin=stdin, env=env,
                                   stdout=subprocess.PIPE, text=True)
            server = int(ask.communicate(timeout=20)[0])
        pids = {client.pid, ask.pid, server}
        # each client hands the server its stdin and stdout: at least 2 SENDs and 2 RECVs each
        events = live.wait(lambda e: e["pid"] in pids, 8, timeout=10)
        send, recv = sides(events)
        assert send and recv, events
        assert_mostly_verified(events, "tmux")
    finally:
        subprocess.run(base + ["kill-server"], capture_output=True)


MP_WORKLOAD = r'''
import json, os
import multiprocessing as mp
from multiprocessing import forkserver, reduction


def child(conn):
    fd = reduction.recv_handle(conn)
    conn.send(os.getpid())
    os.close(fd)


if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    pids = {os.getpid()}
    for path in ("/etc/passwd", "/etc/shadow", "/dev/null"):
        a, b = ctx.Pipe()
        p = ctx.Process(target=child, args=(b,))
        p.start()  # hands the forkserver the child's fds over SCM_RIGHTS
        with open(path, "rb") as f:
            reduction.send_handle(a, f.fileno(), p.pid)  # SCM_RIGHTS to the child
        pids.add(a.recv())
        p.join()
    pids.add(forkserver._forkserver._forkserver_pid)
    print(json.dumps(sorted(pids)))
'''


def test_python_multiprocessing_events_are_verified(live, tmp_path):
    """Python's forkserver and send_handle pass fds with SCM_RIGHTS the ordinary way."""
    script = tmp_path / "mp_workload.py"
    script.write_text(MP_WORKLOAD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    pids = set(json.loads(out.stdout))
    # 3 process starts (parent -> forkserver) and 3 send_handle (parent -> child), both sides
    events = live.wait(lambda e: e["pid"] in pids, 12, timeout=10)
    send, recv = sides(events)
    assert len(send) >= 6 and len(recv) >= 6, events
    assert_mostly_verified(events, "multiprocessing")
