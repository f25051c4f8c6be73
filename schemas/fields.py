"""The event contract, described once as data.

Every other representation of an fdpass event derives from FIELDS: the JSON
keys written by `fdpass collect --jsonl`, the Avro schema in schemas/, the
ClickHouse columns (docs/architecture.md, "The contract"). The fields up to
`probe` are the original contract (the README's table, "The event"); fields
after it are additions, each with a default so older readers and writers
keep working.

Each entry: (name, kind, nullable, doc[, default]). `kind` is one of the
logical kinds below; the Avro and ClickHouse types are chosen from it in one
place each. `default` matters only for an added (post-`probe`), non-nullable
field: the value old messages and old rows read as. Left out, it is the
kind's zero (0, "", false); an enum has no zero, so an added enum names its
default symbol. A nullable field's default is always null.
"""

from __future__ import annotations

from dataclasses import dataclass

DIRECTIONS = ("SEND", "RECV")
# Symbols are only ever appended: Avro writes an enum as its index, ClickHouse's
# Enum8 values follow the order, and the collector maps kernel codes to these.
SYSCALLS = ("SENDMSG", "SENDMMSG", "RECVMSG", "RECVMMSG", "KERNEL",
            "IO_URING_SENDMSG", "IO_URING_SENDMSG_ZC", "IO_URING_RECVMSG")
FILE_TYPES = ("REGULAR", "DIRECTORY", "CHAR", "BLOCK", "FIFO", "SOCKET", "SYMLINK", "ANON", "UNKNOWN")

# The syscall ABI of the call (or, for io_uring, of the ring).
ABIS = ("X86_64", "IA32", "X32")

ENUMS = {"direction": DIRECTIONS, "syscall": SYSCALLS, "file_type": FILE_TYPES, "abi": ABIS}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # string | long | int | bool | enum
    nullable: bool
    doc: str
    default: str | int | bool | None = None  # added non-nullable fields only; None: the kind's zero


FIELDS: tuple[Field, ...] = (
    Field("event_id", "string", False, "unique, deterministic id: host_id:boot_id:ktime_ns:tid:direction:msg_index:fd_index"),
    Field("time_ns", "long", False, "wall-clock UTC nanoseconds since the epoch"),
    Field("host", "string", False, "hostname"),
    Field("host_id", "string", False, "/etc/machine-id"),
    Field("boot_id", "string", False, "/proc/sys/kernel/random/boot_id"),
    Field("kernel", "string", False, "kernel release (uname -r)"),
    Field("direction", "enum", False, "SEND: sender side; RECV: receiver side"),
    Field("syscall", "enum", False, "SENDMSG, SENDMMSG, RECVMSG, RECVMMSG or KERNEL; IO_URING_SENDMSG, "
          "IO_URING_SENDMSG_ZC or IO_URING_RECVMSG for transfers made by io_uring requests"),
    Field("pid", "int", False, "acting process (thread group id)"),
    Field("tid", "int", False, "acting thread"),
    Field("ppid", "int", False, "parent of the acting process"),
    Field("uid", "long", False, "acting real uid"),
    Field("gid", "long", False, "acting real gid"),
    Field("comm", "string", False, "acting task name"),
    Field("parent_comm", "string", False, "parent task name"),
    Field("exe", "string", True, "executable path, if known"),
    Field("mntns_id", "long", False, "mount namespace inode"),
    Field("pidns_id", "long", False, "pid namespace inode"),
    Field("netns_id", "long", False, "network namespace inode"),
    Field("cgroup_id", "long", False, "cgroup v2 id"),
    Field("container_id", "string", True, "container id derived from the cgroup path, if any"),
    Field("sock_fd", "int", False, "the unix socket's descriptor in the acting process"),
    Field("sock_ino", "long", False, "inode of that socket"),
    Field("peer_sock_ino", "long", True, "inode of the connected peer socket (joins a SEND to its RECV)"),
    Field("fd", "int", False, "passed descriptor: sender's fd (SEND) or newly installed fd (RECV)"),
    Field("fd_index", "int", False, "position in the message's SCM_RIGHTS list"),
    Field("fd_count", "int", False, "length of the message's SCM_RIGHTS list"),
    Field("file_path", "string", False, "path as the kernel prints it in /proc/PID/fd"),
    Field("file_ino", "long", False, "inode of the passed file"),
    Field("file_dev", "long", False, "device of the passed file, as stat(2) st_dev"),
    Field("file_type", "enum", False, "REGULAR, DIRECTORY, CHAR, BLOCK, FIFO, SOCKET, SYMLINK, ANON or UNKNOWN"),
    Field("file_flags", "int", False, "open flags of the passed file (O_ACCMODE, O_APPEND, ...)"),
    Field("ret", "long", False, "the syscall's return value"),
    Field("probe", "string", False, "which probe produced it (tracepoint, kprobe)"),
    # fdpass additions (not in the original contract table; all defaulted).
    Field("msg_index", "int", False, "index of the message in a sendmmsg/recvmmsg vector (0 otherwise)"),
    Field("seq", "long", False, "per-boot kernel sequence number of the record; gaps mean lost records"),
    Field("path_truncated", "bool", False, "the path walk hit its depth or size bound: file_path is incomplete"),
    Field("fds_truncated", "bool", False, "the message carried more fds than the probe reads: some are not reported"),
    Field("msg_ctrunc", "bool", False, "RECV: the kernel set MSG_CTRUNC (receiver's control buffer too small; fds dropped)"),
    # v3
    Field("abi", "enum", False, "ABI of the call that moved the fd: X86_64 (native), IA32 (32-bit program or "
          "int $0x80), X32; for io_uring the ring's ABI", default="X86_64"),
    Field("file_verified", "bool", False, "true only when the file identity (path, ino, dev, type, flags) was "
          "read from the kernel's own objects for this transfer (the SCM_RIGHTS list on the socket); false when "
          "it rests on the process's memory or fd table alone (a racing thread could have changed those)"),
    Field("transfer_id", "long", True, "per-boot id of the kernel's SCM_RIGHTS list the fd travelled in: equal "
          "on a SEND and its RECV(s) (join on host_id, boot_id, transfer_id); null when the probe did not see "
          "that kernel object"),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
BY_NAME = {f.name: f for f in FIELDS}
