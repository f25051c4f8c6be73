"""Turn a kernel record into a contract event (schemas/fields.py), adding what
the kernel cannot know cheaply: host identity, wall-clock time, executable,
container id. Lookups are cached so a busy sender costs one dict hit."""

from __future__ import annotations

import operator
import os
import re
import socket
import time
from collections import OrderedDict

from fdpass.collector import records as R


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


class HostInfo:
    def __init__(self) -> None:
        # FDPASS_HOSTNAME: the node's name when the collector runs in a
        # container with a UTS namespace of its own (Kubernetes: spec.nodeName).
        self.host = os.environ.get("FDPASS_HOSTNAME") or socket.gethostname()
        self.host_id = _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id") or "unknown"
        self.boot_id = _read("/proc/sys/kernel/random/boot_id") or "unknown"
        self.kernel = os.uname().release


class WallClock:
    """Converts the kernel's CLOCK_MONOTONIC (bpf_ktime_get_ns) to UTC ns.

    The offset realtime - monotonic is sampled tightly (the narrowest of a
    few bracketed reads) and re-sampled every `refresh_s`, so NTP steps are
    followed. Suspend does not matter: MONOTONIC and the offset move together
    only while awake, and the offset is re-read after."""

    def __init__(self, refresh_s: float = 10.0):
        self.refresh_s = refresh_s
        self._next = 0.0
        self.offset_ns = 0
        self._sample()

    def _sample(self) -> None:
        best = None
        for _ in range(5):
            m0 = time.monotonic_ns()
            r = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, r - (m0 + m1) // 2)
        self.offset_ns = best[1]
        self._next = time.monotonic() + self.refresh_s

    def to_wall(self, ktime_ns: int) -> int:
        if time.monotonic() >= self._next:
            self._sample()
        return ktime_ns + self.offset_ns


# Container runtimes put the 64-hex container id in the cgroup path:
# docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>,
# /docker/<id>, /kubepods/.../<id>.
_CONTAINER_RE = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def container_id_from_cgroup(cgroup_text: str) -> str | None:
    """The container id in a /proc/PID/cgroup text, or None."""
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        m = None
        for m in _CONTAINER_RE.finditer(path):
            pass
        if m:
            return m.group(1)
    return None


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


# The record fields _task_part() reads: equal values give an equal task part.
_TASK_FIELDS = ("cgroup_id", "sock_ino", "peer_sock_ino", "pid", "tid", "ppid", "uid", "gid", "mntns_id",
                "pidns_id", "netns_id", "sock_fd", "direction", "syscall", "comm", "parent_comm", "abi", "probe")
_TASK_KEY = operator.itemgetter(*(R.Record._fields.index(n) for n in _TASK_FIELDS))


class Enricher:
    """Makes contract events (dicts keyed by schemas.fields names) from records."""

    EXE_TTL_S = 5.0

    def __init__(self, host: HostInfo | None = None, clock: WallClock | None = None):
        self.host = host or HostInfo()
        self.clock = clock or WallClock()
        self._exe: LRU = LRU(4096)  # (pid, comm) -> (exe, expires)
        self._container: LRU = LRU(4096)  # cgroup_id -> container id
        self._id_prefix = f"{self.host.host_id}:{self.host.boot_id}:"
        self._parts: dict = {}
        self._parts_expire = 0.0

    def exe(self, pid: int, comm: str) -> str | None:
        key = (pid, comm)
        hit = self._exe.get(key)
        now = time.monotonic()
        if hit and hit[1] > now:
            return hit[0]
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:  # exited already, or a kernel thread
            exe = hit[0] if hit else None
        self._exe.put(key, (exe, now + self.EXE_TTL_S))
        return exe

    def container_id(self, pid: int, cgroup_id: int) -> str | None:
        if cgroup_id in self._container:
            return self._container[cgroup_id]
        text = _read(f"/proc/{pid}/cgroup", default="")
        cid = container_id_from_cgroup(text) if text else None
        if text:  # only cache what we could read
            self._container.put(cgroup_id, cid)
        return cid

    def _task_part(self, rec: R.Record) -> dict:
        """Every field that is the same for all fds of one syscall, in contract order."""
        direction = R.DIRECTIONS.get(rec.direction)
        if direction is None:  # never guessed: a record the decoder does not know is a bad record
            raise ValueError(f"kernel record with an unknown direction {rec.direction} "
                             f"(pid {rec.pid}, tid {rec.tid}); bpf/fdpass.h and collector/records.py disagree")
        comm = rec.comm.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        return {
            "event_id": None,
            "time_ns": None,
            "host": self.host.host,
            "host_id": self.host.host_id,
            "boot_id": self.host.boot_id,
            "kernel": self.host.kernel,
            "direction": direction,
            "syscall": R.SYSCALLS.get(rec.syscall, "KERNEL"),
            "pid": rec.pid,
            "tid": rec.tid,
            "ppid": rec.ppid,
            "uid": rec.uid,
            "gid": rec.gid,
            "comm": comm,
            "parent_comm": rec.parent_comm.split(b"\0", 1)[0].decode("utf-8", "backslashreplace"),
            "exe": self.exe(rec.pid, comm),
            "mntns_id": rec.mntns_id,
            "pidns_id": rec.pidns_id,
            "netns_id": rec.netns_id,
            "cgroup_id": rec.cgroup_id,
            "container_id": self.container_id(rec.pid, rec.cgroup_id),
            "sock_fd": rec.sock_fd,
            "sock_ino": rec.sock_ino,
            "peer_sock_ino": rec.peer_sock_ino if rec.flags & R.F_PEER else None,
        }

    def expire(self) -> bool:
        """Empty the task-part cache every EXE_TTL_S (so exe follows an exec);
        True when it did, for caches built on it (collector/batch.py)."""
        now = time.monotonic()
        if now < self._parts_expire:
            return False
        self._parts.clear()
        self._parts_expire = now + self.EXE_TTL_S
        return True

    def event(self, rec: R.Record, raw_path: bytes) -> dict:
        # A busy sender repeats the same task, socket and syscall: build that
        # part once (it needs /proc lookups and string decoding) and copy it.
        # The cache is emptied every EXE_TTL_S so exe follows an exec.
        key = (_TASK_KEY(rec), rec.flags & R.F_PEER)
        self.expire()
        part = self._parts.get(key)
        if part is None:
            if len(self._parts) >= 4096:
                self._parts.clear()
            part = self._parts[key] = self._task_part(rec)
        e = part.copy()
        flags = rec.flags
        e["event_id"] = f"{self._id_prefix}{rec.ktime_ns}:{rec.tid}:{part['direction']}:{rec.msg_index}:{rec.fd_index}"
        e["time_ns"] = self.clock.to_wall(rec.ktime_ns)
        e["fd"] = rec.fd
        e["fd_index"] = rec.fd_index
        e["fd_count"] = rec.fd_count
        e["file_path"] = R.render_path(rec, raw_path)
        e["file_ino"] = rec.file_ino
        e["file_dev"] = R.kernel_dev_to_st_dev(rec.file_dev)
        e["file_type"] = "UNKNOWN" if flags & R.F_NO_FILE else R.file_type(rec.i_mode, rec.sb_magic)
        e["file_flags"] = rec.file_flags
        e["ret"] = rec.ret
        e["probe"] = R.PROBES.get(rec.probe, "tracepoint")
        e["msg_index"] = rec.msg_index
        e["seq"] = rec.seq
        e["path_truncated"] = bool(flags & R.F_PATH_TRUNC)
        e["fds_truncated"] = bool(flags & R.F_FDS_TRUNC)
        e["msg_ctrunc"] = bool(flags & R.F_CTRUNC)
        e["abi"] = R.ABIS.get(rec.abi, "X86_64")
        e["file_verified"] = bool(flags & R.F_VERIFIED)
        e["transfer_id"] = rec.transfer_id or None
        return e
