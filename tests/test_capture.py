"""The real probes against real transfers, checked against ground truth the
test takes itself (os.fstat, readlink of /proc/self/fd/N). Root, BTF, bcc."""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests import workloads as W

pytestmark = pytest.mark.bpf


def ino(sock) -> int:
    return os.fstat(sock.fileno()).st_ino


def kernel_path(fd: int) -> str:
    """What the kernel prints for fd, in the form fdpass reports it (non-UTF-8 as \\xNN)."""
    return os.fsencode(os.readlink(f"/proc/self/fd/{fd}")).decode("utf-8", "backslashreplace")


def truth(fd: int) -> dict:
    st = os.fstat(fd)
    return {
        "file_path": kernel_path(fd),
        "file_ino": st.st_ino,
        "file_dev": st.st_dev,
        "file_flags_acc": fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE,
    }


def assert_matches(event: dict, fd: int) -> None:
    t = truth(fd)
    assert event["file_path"] == t["file_path"]
    assert event["file_ino"] == t["file_ino"]
    assert event["file_dev"] == t["file_dev"]
    assert event["file_flags"] & os.O_ACCMODE == t["file_flags_acc"]


def by_direction(events: list[dict]) -> tuple[list[dict], list[dict]]:
    return [e for e in events if e["direction"] == "SEND"], [e for e in events if e["direction"] == "RECV"]


def transfer(live, fds: list[int], sock_type=socket.SOCK_STREAM):
    """Send fds in one message over a fresh socketpair and receive them.
    Returns (send events, recv events, received fds, sender, receiver)."""
    a, b = socket.socketpair(socket.AF_UNIX, sock_type)
    socket.send_fds(a, [b"x"], fds)
    _msg, got, _flags, _ = socket.recv_fds(b, 16, len(fds) + 4)
    send, recv = by_direction(live.for_socks(a, b, count=2 * len(fds)))
    return send, recv, got, a, b


def check_both_sides(live, fds: list[int], expect_type: str | None = None, sock_type=socket.SOCK_STREAM):
    send, recv, got, a, b = transfer(live, fds, sock_type)
    try:
        assert len(send) == len(fds) and len(recv) == len(fds), (send, recv)
        for i, (s, r, fd, new) in enumerate(zip(send, recv, fds, got)):
            assert (s["fd"], s["fd_index"], s["fd_count"]) == (fd, i, len(fds))
            assert (r["fd"], r["fd_index"], r["fd_count"]) == (new, i, len(fds))
            assert_matches(s, fd)
            assert_matches(r, new)
            if expect_type:
                assert s["file_type"] == r["file_type"] == expect_type
            # the join key: sender's peer is the receiver's socket and back
            assert s["sock_ino"] == ino(a) and r["sock_ino"] == ino(b)
            assert s["peer_sock_ino"] == ino(b) and r["peer_sock_ino"] == ino(a)
            assert s["pid"] == r["pid"] == os.getpid()
            assert s["tid"] == threading.get_native_id()
            assert s["syscall"] == "SENDMSG" and r["syscall"] == "RECVMSG"
            assert not (s["path_truncated"] or s["fds_truncated"] or r["msg_ctrunc"])
        return send, recv
    finally:
        for fd in got:
            os.close(fd)
        a.close()
        b.close()


def test_regular_file_and_task_fields(live):
    with open("/etc/passwd", "rb") as f:
        send, recv = check_both_sides(live, [f.fileno()], "REGULAR")
    e = send[0]
    assert e["file_path"] == "/etc/passwd"
    assert e["ppid"] == os.getppid()
    assert e["uid"] == os.getuid() and e["gid"] == os.getgid()
    assert e["mntns_id"] == os.stat("/proc/self/ns/mnt").st_ino
    assert e["netns_id"] == os.stat("/proc/self/ns/net").st_ino
    assert e["pidns_id"] == os.stat("/proc/self/ns/pid").st_ino
    assert e["exe"] == os.readlink("/proc/self/exe")
    with open(f"/proc/{os.getppid()}/comm") as c:
        assert e["parent_comm"] == c.read().strip()[:15]
    assert abs(e["time_ns"] - time.time_ns()) < 30e9
    assert e["event_id"].count(":") >= 6 and len({x["event_id"] for x in send + recv}) == 2
    # seq: this probe load's run number on top, then a counter with no gaps here
    assert {x["seq"] >> 48 for x in send + recv} == {live.collector.probes.run_id}


def test_directory(live, tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        check_both_sides(live, [fd], "DIRECTORY")
    finally:
        os.close(fd)


def test_pipe(live):
    r, w = os.pipe()
    try:
        send, _ = check_both_sides(live, [r, w], "FIFO")
        assert send[0]["file_path"].startswith("pipe:[")
        assert send[1]["file_flags"] & os.O_ACCMODE == os.O_WRONLY
    finally:
        os.close(r)
        os.close(w)


def test_unix_and_tcp_sockets(live):
    u1, u2 = socket.socketpair()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    try:
        send, _ = check_both_sides(live, [u1.fileno(), srv.fileno()], "SOCKET")
        assert send[1]["file_path"] == f"socket:[{ino(srv)}]"
    finally:
        for s in (u1, u2, srv):
            s.close()


def test_memfd_and_eventfd(live):
    m = os.memfd_create("fdpass-test")
    e = os.eventfd(0)
    try:
        send, _ = check_both_sides(live, [m, e])
        assert send[0]["file_path"] == "/memfd:fdpass-test (deleted)"
        assert send[1]["file_path"] == "anon_inode:[eventfd]" and send[1]["file_type"] == "ANON"
    finally:
        os.close(m)
        os.close(e)


def test_path_crosses_a_tmpfs_mount(live, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fdpass-test", str(mnt)], check=True)
    try:
        (mnt / "inner").mkdir()
        p = mnt / "inner" / "file.txt"
        p.write_text("x")
        fd = os.open(p, os.O_RDWR)
        try:
            send, _ = check_both_sides(live, [fd], "REGULAR")
            assert send[0]["file_path"] == str(p)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_unlinked_file(live, tmp_path):
    p = tmp_path / "gone.txt"
    p.write_text("x")
    fd = os.open(p, os.O_RDONLY)
    os.unlink(p)
    try:
        send, _ = check_both_sides(live, [fd])
        assert send[0]["file_path"] == f"{p} (deleted)"
    finally:
        os.close(fd)


def test_non_utf8_name(live, tmp_path):
    p = os.fsencode(tmp_path) + b"/bad-\xff\xfe-name"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        send, _ = check_both_sides(live, [fd])
        assert send[0]["file_path"].endswith("/bad-\\xff\\xfe-name")
    finally:
        os.close(fd)


def test_long_path_over_512_bytes(live, tmp_path):
    d = tmp_path
    for i in range(6):
        d = d / (f"{i}" * 100)
    d.mkdir(parents=True)
    p = d / "leaf.txt"
    p.write_text("x")
    assert len(str(p)) > 600
    fd = os.open(p, os.O_RDONLY)
    try:
        send, _ = check_both_sides(live, [fd])
        assert send[0]["file_path"] == str(p)
    finally:
        os.close(fd)


def test_path_deeper_than_walk_bound_says_so(live, tmp_path):
    from fdpass.collector.probes import Probes  # noqa: F401  (bound documented there)

    depth = 60  # PATH_DEPTH is 40
    rel = "/".join(f"d{i}" for i in range(depth))
    os.makedirs(tmp_path / rel)
    p = tmp_path / rel / "deep.txt"
    p.write_text("x")
    fd = os.open(p, os.O_RDONLY)
    a, b = socket.socketpair()
    try:
        socket.send_fds(a, [b"x"], [fd])
        events = live.for_socks(a, count=1)
        assert len(events) == 1
        e = events[0]
        assert e["path_truncated"] is True
        assert e["file_path"].startswith(".../")  # never a plausible absolute path
        assert str(p).endswith(e["file_path"][3:])
        assert e["file_ino"] == os.fstat(fd).st_ino
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_two_scm_rights_cmsgs_in_one_message(live):
    r, w = os.pipe()
    f = os.open("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd", os.O_RDONLY)
    a, b = socket.socketpair()
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f])),
               (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))]
        a.sendmsg([b"x"], anc)
        _m, got, _fl, _ = socket.recv_fds(b, 16, 8)
        events = live.for_socks(a, b, count=6)
        send, recv = by_direction(events)
        assert [e["fd"] for e in send] == [f, r, w]
        assert [e["fd_index"] for e in send] == [0, 1, 2] and {e["fd_count"] for e in send} == {3}
        assert [e["fd"] for e in recv] == got
        for fd in got:
            os.close(fd)
    finally:
        for fd in (r, w, f):
            os.close(fd)
        a.close()
        b.close()


def test_sendmmsg_reports_only_messages_sent_and_recvmmsg(live):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    f1 = os.open("/etc/passwd", os.O_RDONLY)
    r, w = os.pipe()
    try:
        # The third message carries a bad fd: the kernel sends the first two,
        # then stops, and sendmmsg returns 2.
        sent = W.sendmmsg(a, [(b"m0", W.rights([f1])), (b"m1", W.rights([r, w])), (b"m2", W.rights([9999]))])
        assert sent == 2
        received = W.recvmmsg(b, 4, flags=socket.MSG_DONTWAIT)
        assert [len(x[1]) for x in received] == [1, 2]
        events = live.for_socks(a, b, count=6)
        send, recv = by_direction(events)
        assert [(e["msg_index"], e["fd_index"], e["fd"]) for e in send] == [(0, 0, f1), (1, 0, r), (1, 1, w)]
        assert {e["syscall"] for e in send} == {"SENDMMSG"} and {e["ret"] for e in send} == {2}
        new = [fd for x in received for fd in x[1]]
        assert [(e["msg_index"], e["fd"]) for e in recv] == [(0, new[0]), (1, new[1]), (1, new[2])]
        assert {e["syscall"] for e in recv} == {"RECVMMSG"}
        for e, fd in zip(recv, new):
            assert_matches(e, fd)
        # each message's list is a transfer of its own, on both sides (where ids are given)
        ids = [e["transfer_id"] for e in send + recv]
        if None not in ids:
            assert ids[0] != ids[1] == ids[2] and ids[3:] == ids[:3], ids
        for fd in new:
            os.close(fd)
    finally:
        for fd in (f1, r, w):
            os.close(fd)
        a.close()
        b.close()


def test_failed_sendmsg_emits_nothing(live):
    a, b = socket.socketpair()
    a.shutdown(socket.SHUT_WR)
    f = os.open("/etc/passwd", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            socket.send_fds(a, [b"x"], [f])
        assert_no_events_from(live, a, f)
    finally:
        os.close(f)
        a.close()
        b.close()


def assert_no_events_from(live, sock, fd: int) -> None:
    """No event came from `sock`; a successful transfer of `fd` on a fresh pair,
    made after, shows the probes were live all along."""
    c, d = socket.socketpair()
    try:
        socket.send_fds(c, [b"x"], [fd])
        assert len(live.for_socks(c, count=1)) == 1
        assert live.matching(lambda e: e["sock_ino"] == ino(sock)) == []
    finally:
        c.close()
        d.close()


def test_msg_ctrunc_flagged(live):
    a, b = socket.socketpair()
    fds = [os.open("/etc/passwd", os.O_RDONLY) for _ in range(3)]
    try:
        socket.send_fds(a, [b"x"], fds)
        _m, anc, flags, _ = b.recvmsg(16, socket.CMSG_LEN(4))  # room for one fd only
        assert flags & socket.MSG_CTRUNC
        got = W.parse_rights(b"".join(W.cmsg(lv, ty, data) for lv, ty, data in anc))
        assert len(got) == 1
        events = live.for_socks(b, count=1)
        assert len(events) == 1, events
        assert events[0]["msg_ctrunc"] is True and events[0]["fd"] == got[0] and events[0]["fd_count"] == 1
        os.close(got[0])
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_garbage_and_truncated_control_buffers(live):
    a, b = socket.socketpair()
    f = os.open("/etc/passwd", os.O_RDONLY)
    good = W.rights([f])
    cases = [
        os.urandom(64),                       # random bytes
        good[:18],                            # cut inside the first fd
        good,                                 # valid cmsg but controllen shorter than cmsg_len
        W.cmsg(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"\xff\xff\xff\x7f"),  # bad fd number
        b"\xff" * 8 + b"\1\0\0\0\1\0\0\0" + b"\0" * 8,  # absurd cmsg_len
    ]
    try:
        for i, ctrl in enumerate(cases):
            controllen = 19 if i == 2 else None
            try:
                W.sendmsg_raw(a, b"x", ctrl, controllen)
            except OSError:
                pass
            else:  # every case is invalid: if the kernel took one, the case is wrong
                pytest.fail(f"kernel accepted garbage control case {i}")
        assert_no_events_from(live, a, f)
    finally:
        os.close(f)
        a.close()
        b.close()


def many_threads_transfer(live, tmp_path, threads: int = 8, per_thread: int = 150):
    results: dict[int, tuple] = {}

    def worker(i: int):
        p = tmp_path / f"t{i}.txt"
        p.write_text(str(i))
        fd = os.open(p, os.O_RDONLY)
        a, b = socket.socketpair()
        for _ in range(per_thread):
            socket.send_fds(a, [b"x"], [fd])
            _m, got, _f, _ = socket.recv_fds(b, 4, 2)
            os.close(got[0])
        results[i] = (threading.get_native_id(), ino(a), ino(b), str(p), fd, a, b)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    all_inos = {r[1] for r in results.values()} | {r[2] for r in results.values()}
    live.wait(lambda e: e["sock_ino"] in all_inos, 2 * threads * per_thread, timeout=30)
    for tid, ia, ib, path, fd, a, b in results.values():
        send = live.matching(lambda e: e["sock_ino"] == ia)
        recv = live.matching(lambda e: e["sock_ino"] == ib)
        assert len(send) == per_thread and len(recv) == per_thread
        assert {e["file_path"] for e in send + recv} == {path}
        assert {e["tid"] for e in send + recv} == {tid}
        assert {e["fd"] for e in send} == {fd}
        assert len({e["event_id"] for e in send + recv}) == 2 * per_thread
        os.close(fd)
        a.close()
        b.close()


def test_many_threads_no_lost_or_mixed_events(live, tmp_path):
    many_threads_transfer(live, tmp_path)


def test_many_threads_when_every_pending_slot_collides(tmp_path):
    """One pending slot, held by a thread blocked in recvmsg: every other
    thread's syscalls take the spill map, and still nothing is lost or mixed.
    (The tracepoint backend's pending slots; the kernel backend has none.)"""
    from tests.fixtures_bpf import LiveCollector, require_bpf

    require_bpf()
    lc = LiveCollector(tuning={"PENDING_SLOTS": 1}, backend="tracepoint")
    xa, xb = socket.socketpair()
    got: list[int] = []
    blocker = threading.Thread(target=lambda: got.extend(socket.recv_fds(xb, 4, 2)[1]))
    try:
        blocker.start()
        time.sleep(0.2)  # let it block inside recvmsg, holding the slot
        many_threads_transfer(lc, tmp_path, threads=4, per_thread=100)
        with open("/etc/passwd") as f:
            socket.send_fds(xa, [b"x"], [f.fileno()])
        blocker.join(10)
        events = lc.for_socks(xb, count=1)
        assert [(e["direction"], e["fd"]) for e in events] == [("RECV", got[0])]
        os.close(got[0])
    finally:
        stats = lc.close()
        xa.close()
        xb.close()
    assert stats["kernel_pending_full"] == 0
    assert stats["kernel_pending_spilled"] >= 4 * 100 * 2  # the spill path really ran


def test_tmux_client_hands_its_terminal_to_the_server(live, tmp_path):
    """A workload we did not write: a tmux client passes its stdin to the server."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is not installed (scripts/setup installs it)")
    sock = tmp_path / "tmux.sock"
    stdin_file = tmp_path / "client-stdin"
    stdin_file.write_text("")
    env = dict(os.environ, TMUX="", TERM="xterm")
    with open(stdin_file) as stdin:
        subprocess.run([tmux, "-S", str(sock), "new-session", "-d", "sleep 30"], stdin=stdin, env=env,
                       check=True, timeout=20)
        subprocess.run([tmux, "-S", str(sock), "list-sessions"], stdin=stdin, env=env, check=True,
                       timeout=20, capture_output=True)
    try:
        want = str(stdin_file)
        events = live.wait(lambda e: e["file_path"] == want and e["comm"].startswith("tmux"), 4, timeout=10)
        send, recv = by_direction(events)
        assert send and recv, events
        st = os.stat(stdin_file)
        for e in events:
            assert (e["file_ino"], e["file_dev"]) == (st.st_ino, st.st_dev)
        # each SEND's peer socket is the socket some RECV came in on
        assert {e["peer_sock_ino"] for e in send} & {e["sock_ino"] for e in recv}
    finally:
        subprocess.run([tmux, "-S", str(sock), "kill-server"], capture_output=True)


def test_namespace_change_after_first_transfer_is_seen(live):
    """The per-process cache in the probe must notice unshare(CLONE_NEWNS)."""
    child = r"""
import os, socket, ctypes
a, b = socket.socketpair()
f = os.open("/etc/passwd", os.O_RDONLY)
before = os.stat("/proc/self/ns/mnt").st_ino
socket.send_fds(a, [b"x"], [f])
if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:
    raise OSError(ctypes.get_errno(), "unshare")
after = os.stat("/proc/self/ns/mnt").st_ino
socket.send_fds(a, [b"x"], [f])
print(os.fstat(a.fileno()).st_ino, before, after)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    sock, before, after = (int(x) for x in out.split())
    assert before != after
    events = live.wait(lambda e: e["sock_ino"] == sock, 2)
    assert [e["mntns_id"] for e in events] == [before, after]


# The in-kernel backend's receives may reuse the send's path walk (a short record
# completed in user space: docs/kernel.md, "Receives reuse the send's walk"). The
# events must still be what the kernel says at the receive, whatever happened to
# the file, its path or the receiver's root since the send; both backends.

def reuse_stats(live) -> tuple[int, int]:
    s = live.collector.stats()
    return s["kernel_recv_reused"], s["kernel_recv_unresolved"]


def test_recv_reusing_the_send_walk_is_exact(live, tmp_path):
    (tmp_path / "d").mkdir()
    fds = [os.open(tmp_path / "d" / f"f{i}", os.O_CREAT | os.O_RDWR, 0o600) for i in range(3)] + [os.open("/", os.O_RDONLY)]
    r, w = os.pipe()
    fds += [r, w]
    reused, _ = reuse_stats(live)
    try:
        send, recv = check_both_sides(live, fds)
        for s, v in zip(send, recv):
            assert (s["file_path"], s["file_ino"], s["file_dev"], s["file_type"], s["file_flags"]) == \
                (v["file_path"], v["file_ino"], v["file_dev"], v["file_type"], v["file_flags"])
        assert [v["file_path"] for v in recv[:4]] == [str(tmp_path / "d" / f"f{i}") for i in range(3)] + ["/"]
    finally:
        for fd in fds:
            os.close(fd)
    if live.collector.probes.backend == "kernel" and live.collector.probes.defines.get("SAME_FORM"):
        # every receive above reused its send's walk, and none was left unresolved
        assert reuse_stats(live)[0] >= reused + len(fds)
    assert reuse_stats(live)[1] == 0


def change_file(kind: str, tmp_path, fd: int) -> None:
    if kind == "rename":
        os.rename(tmp_path / "d" / "f", tmp_path / "d" / "g")
    elif kind == "rename_parent":  # the file's own dentry is untouched
        os.rename(tmp_path / "d", tmp_path / "e")
    elif kind == "unlink":
        os.unlink(tmp_path / "d" / "f")
    elif kind == "setfl":
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND | os.O_NONBLOCK)
    elif kind == "umount_lazy":  # a mount change: the file's mount is detached, its path now starts there
        subprocess.run(["umount", "-l", str(tmp_path / "m")], check=True)


@pytest.mark.parametrize("kind", ["rename", "rename_parent", "unlink", "setfl", "umount_lazy"])
def test_recv_after_the_file_changed_since_the_send(live, tmp_path, kind):
    """Each side reports the file as it is at its own moment: a rename (of the
    file or a directory above it), an unlink, new open flags or a detached mount
    between the send and the receive show in the RECV and not in the SEND."""
    (tmp_path / "d").mkdir()
    mounted = kind == "umount_lazy"
    if mounted:
        (tmp_path / "m").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "fdpass-test", str(tmp_path / "m")], check=True)
        (tmp_path / "m" / "d").mkdir()
        fd = os.open(tmp_path / "m" / "d" / "f", os.O_CREAT | os.O_RDWR, 0o600)
    else:
        fd = os.open(tmp_path / "d" / "f", os.O_CREAT | os.O_RDWR, 0o600)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got = []
    try:
        before = truth(fd)
        flags_before = fcntl.fcntl(fd, fcntl.F_GETFL)
        socket.send_fds(a, [b"x"], [fd])
        change_file(kind, tmp_path, fd)
        _msg, got, _flags, _ = socket.recv_fds(b, 16, 4)
        send, recv = by_direction(live.for_socks(a, b, count=2))
        assert len(send) == len(recv) == 1, (send, recv)
        assert send[0]["file_path"] == before["file_path"]
        assert_matches(recv[0], got[0])
        after = truth(got[0])
        assert recv[0]["file_path"] == after["file_path"] != before["file_path"] or kind == "setfl"
        if kind == "unlink":
            assert recv[0]["file_path"] == before["file_path"] + " (deleted)"
        if kind == "setfl":
            # the receive reads the shared file's flags again
            assert recv[0]["file_flags"] & (os.O_APPEND | os.O_NONBLOCK) == os.O_APPEND | os.O_NONBLOCK
            assert not send[0]["file_flags"] & (os.O_APPEND | os.O_NONBLOCK)
            assert flags_before & os.O_APPEND == 0
    finally:
        for x in got:
            os.close(x)
        os.close(fd)
        a.close()
        b.close()
        if mounted:
            subprocess.run(["umount", "-l", str(tmp_path / "m")], capture_output=True)
    assert reuse_stats(live)[1] == 0


# A receiver in a chroot: its paths start at its own root, not the sender's.
CHROOTED = r"""
import os, socket, sys
b = socket.socket(fileno=int(sys.argv[2]))
os.chroot(sys.argv[1])
os.chdir("/")
print(os.getpid(), flush=True)
_msg, got, _flags, _ = socket.recv_fds(b, 16, 4)
print(got[0], os.fstat(got[0]).st_ino, flush=True)
"""


def test_recv_in_a_chroot_names_the_path_from_its_own_root(live, tmp_path):
    (tmp_path / "sub").mkdir()
    fd = os.open(tmp_path / "sub" / "file.txt", os.O_CREAT | os.O_RDWR, 0o600)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = subprocess.Popen([sys.executable, "-c", CHROOTED, str(tmp_path), str(b.fileno())],
                             pass_fds=[b.fileno()], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        socket.send_fds(a, [b"x"], [fd])
        new_fd, new_ino = (int(x) for x in child.stdout.readline().split())
        send, recv = by_direction(live.for_socks(a, b, count=2))
        assert len(send) == len(recv) == 1, (send, recv)
        assert send[0]["file_path"] == str(tmp_path / "sub" / "file.txt")
        assert (recv[0]["pid"], recv[0]["fd"], recv[0]["file_ino"]) == (pid, new_fd, new_ino)
        assert recv[0]["file_path"] == "/sub/file.txt"
    finally:
        child.wait(10)
        os.close(fd)
        a.close()
        b.close()
    assert reuse_stats(live)[1] == 0


# The receiver alone is traced (--pid): no SEND record, so the RECV walks in full.
RECEIVER = r"""
import os, socket, sys
b = socket.socket(fileno=int(sys.argv[1]))
print(os.getpid(), flush=True)
sys.stdin.readline()  # the collector is attached (a receive already waiting is not seen by tracepoints)
_msg, got, _flags, _ = socket.recv_fds(b, 16, 4)
st = os.fstat(got[0])
print(got[0], st.st_ino, st.st_dev, os.readlink(f"/proc/self/fd/{got[0]}"), flush=True)
"""


def test_recv_whose_sender_is_filtered_out_is_complete(tmp_path):
    from fdpass.collector.probes import Filters
    from tests.fixtures_bpf import LiveCollector, require_bpf

    require_bpf()
    fd = os.open(tmp_path / "only-the-receiver-sees-me", os.O_CREAT | os.O_RDWR, 0o600)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(b.fileno())], pass_fds=[b.fileno()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(child.stdout.readline())
    lc = LiveCollector(Filters(pid=pid))
    try:
        socket.send_fds(a, [b"x"], [fd])
        child.stdin.write("go\n")
        child.stdin.flush()
        new_fd, new_ino, new_dev, path = child.stdout.readline().split()
        events = lc.for_socks(a, b, count=1)
        assert [(e["direction"], e["pid"], e["fd"], e["file_ino"], e["file_dev"], e["file_path"]) for e in events] \
            == [("RECV", pid, int(new_fd), int(new_ino), int(new_dev), path)]
        assert path == str(tmp_path / "only-the-receiver-sees-me")
    finally:
        child.wait(10)
        stats = lc.close()
        os.close(fd)
        a.close()
        b.close()
    assert stats["kernel_recv_reused"] == 0 and stats["kernel_recv_unresolved"] == 0
