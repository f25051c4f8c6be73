"""Where the in-kernel backend's FD records wait for their call's outcome.

bpf/fdpass_kernel.bpf.c emits each fd the moment the kernel takes (SEND) or
installs (RECV) it, while it holds the file, so the identity is exact. Whether
the message got through, and the call's syscall, abi, sock_fd and return value,
are known only later: a CALL_END record per call, from the same thread, follows;
it also carries the end of the call's last message (fd_count > 0: the MSG_END
fields), and each earlier message of a sendmmsg/recvmmsg has a MSG_END record of
its own. Here FD records are held by thread id until the CALL_END, then
completed and released, or dropped when their message or call failed (what the
tracepoint backend never reports either, as it emits only after a successful
call).

A RECV may come in a short form (KIND_FD_SAME, bpf/fdpass.h): the kernel found
that the file it installs is the one a SEND record of the same transfer and fd
position named, with nothing changed that the path depends on, and skipped the
identity and path walk. Its file fields are filled here from that SEND record,
which is kept by transfer id until a SEND record SAME_SPAN ids later has come
(the kernel sends the short form only for a SEND record still kept by that
rule: docs/kernel.md, "Receives reuse the send's walk").
"""

from __future__ import annotations

from collections import OrderedDict

from fdpass.collector import records as R

# Threads with a call in progress kept at once; past this the oldest is
# dropped and counted (a call whose end was never seen, e.g. a kernel path
# fdpass does not hook).
MAX_THREADS = 4096
MMSG = ("SENDMMSG", "RECVMMSG")
# What a short RECV takes from its SEND record besides the path: the flags of the walk (the
# receive sends FDP_F_DELETED itself, except for pseudo files, which have none).
WALK_FLAGS = R.F_DNAME | R.F_PATH_TRUNC


class _Call:
    __slots__ = ("fds", "msgs")

    def __init__(self):
        self.fds: list[tuple[R.Record, bytes]] = []
        self.msgs: dict[int, R.Record] = {}


class KernelCalls:
    def __init__(self, max_threads: int = MAX_THREADS):
        self.calls: OrderedDict[int, _Call] = OrderedDict()
        self.max_threads = max_threads
        self.unfinished_dropped = 0  # FD records whose call end never came
        self.failed_dropped = 0  # FD records of messages or calls that failed
        # SEND records' file fields by transfer id, then fd_index, oldest transfer first
        self.sent: OrderedDict[int, dict[int, tuple]] = OrderedDict()
        self.sent_top = -1  # the highest transfer id count a SEND record carried
        self.recv_reused = 0  # short RECVs completed from their SEND record
        self.recv_unresolved = 0  # short RECVs whose SEND record was not kept (a bug: counted, dropped)

    def _call(self, tid: int) -> _Call:
        call = self.calls.get(tid)
        if call is None:
            call = self.calls[tid] = _Call()
            if len(self.calls) > self.max_threads:
                _tid, old = self.calls.popitem(last=False)
                self.unfinished_dropped += len(old.fds)
        return call

    def add(self, rec: R.Record, raw: bytes) -> list[tuple[R.Record, bytes]]:
        """Take one record of the kernel backend; return the FD records it completes."""
        if rec.kind == R.KIND_FD:
            if rec.direction == R.DIR_SEND and rec.transfer_id and rec.fd_index < R.SAME_FDS:
                self._remember(rec, raw)
            self._call(rec.tid).fds.append((rec, raw))
        elif rec.kind == R.KIND_FD_SAME:
            full = self._same(rec)
            if full is not None:
                self._call(rec.tid).fds.append(full)
        elif rec.kind == R.KIND_MSG_END:
            self._call(rec.tid).msgs[rec.msg_index] = rec
        elif rec.kind == R.KIND_CALL_END:
            call = self.calls.pop(rec.tid, None)
            if call is not None:
                if rec.fd_count:  # it ends the call's last message too
                    call.msgs[rec.msg_index] = rec
                return self._finish(call, rec)
        return []

    def _remember(self, rec: R.Record, path: bytes) -> None:
        xid = rec.transfer_id
        files = self.sent.get(xid)
        if files is None:
            files = self.sent[xid] = {}
        # A second SEND record at one transfer's position (the kernel gives each list its own
        # id, so never): which one a short RECV means is unknown, so neither is used.
        files[rec.fd_index] = None if rec.fd_index in files else (
            rec.file_ino, rec.file_dev, rec.i_mode, rec.sb_magic, rec.ncomp, rec.path_len, rec.flags & WALK_FLAGS, path)
        n = xid & R.XID_N_MASK
        if n > self.sent_top:
            self.sent_top = n
            sent = self.sent
            while sent:  # forget transfers SAME_SPAN ids below the newest (front first)
                first = next(iter(sent))
                if (first & R.XID_N_MASK) + R.SAME_SPAN > n:
                    break
                del sent[first]

    def _same(self, rec: R.Record) -> tuple[R.Record, bytes] | None:
        """A short RECV with its SEND record's file fields and path."""
        got = self.sent.get(rec.transfer_id, {}).get(rec.fd_index)
        if got is None:
            self.recv_unresolved += 1
            return None
        ino, dev, mode, magic, ncomp, path_len, walk_flags, path = got
        flags = walk_flags | (rec.flags & ~R.F_DELETED if walk_flags & R.F_DNAME else rec.flags)
        self.recv_reused += 1
        return rec._replace(kind=R.KIND_FD, file_ino=ino, file_dev=dev, i_mode=mode, sb_magic=magic,
                            ncomp=ncomp, path_len=path_len, flags=flags), path

    def _finish(self, call: _Call, end: R.Record) -> list[tuple[R.Record, bytes]]:
        out = []
        mmsg = R.SYSCALLS.get(end.syscall) in MMSG
        for rec, raw in call.fds:
            msg = call.msgs.get(rec.msg_index)
            # a message counts if it got through and the call says so: sendmmsg
            # and recvmmsg return how many messages they handled
            if end.ret < 0 or msg is None or not msg.fd_index or (mmsg and rec.msg_index >= end.ret):
                self.failed_dropped += 1
                continue
            out.append((rec._replace(syscall=end.syscall, abi=end.abi, sock_fd=end.sock_fd, ret=end.ret,
                                     sock_ino=msg.sock_ino, peer_sock_ino=msg.peer_sock_ino,
                                     fd_count=msg.fd_count, flags=rec.flags | msg.flags), raw))
        return out
