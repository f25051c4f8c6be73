"""Decode the kernel's records (struct fdp_event in bpf/fdpass.h), exactly that layout.

tests/test_records_layout.py compiles bpf/fdpass.h with the host C compiler
and checks every field offset here against it, so the two cannot drift.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections import namedtuple

FDP_COMM_LEN = 16
FDP_PATH_MAX = 4096
FDP_NAME_MAX = 256
FDP_PATH_BUF = FDP_PATH_MAX + FDP_NAME_MAX

KIND_FD, KIND_LOSS = 1, 2
# The in-kernel backend's FD records wait for these (collector/kernel_calls.py).
KIND_MSG_END, KIND_CALL_END = 3, 4
# A RECV that names its SEND record (same transfer_id and fd_index) for the file's
# identity and path, and the bound that makes that record still known (bpf/fdpass.h).
KIND_FD_SAME = 5
SAME_SPAN = 4096
SAME_FDS = 16
XID_N_MASK = (1 << 48) - 1  # a transfer id's count, below the run id
DIR_SEND, DIR_RECV = 1, 2
DIRECTIONS = {DIR_SEND: "SEND", DIR_RECV: "RECV"}
SYSCALLS = {1: "SENDMSG", 2: "SENDMMSG", 3: "RECVMSG", 4: "RECVMMSG",
            5: "IO_URING_SENDMSG", 6: "IO_URING_SENDMSG_ZC", 7: "IO_URING_RECVMSG"}
ABIS = {1: "X86_64", 2: "IA32", 3: "X32"}
PROBES = {1: "tracepoint", 2: "raw_tracepoint", 3: "fentry"}
PROBE_FENTRY = 3

F_PATH_TRUNC = 0x01
F_FDS_TRUNC = 0x02
F_CTRUNC = 0x04
F_DNAME = 0x08
F_DELETED = 0x10
F_NO_FILE = 0x20
F_PEER = 0x40
F_VERIFIED = 0x80

# Superblock magics of the pseudo filesystems whose files name themselves
# (d_op->d_dname in the kernel); include/uapi/linux/magic.h.
SOCKFS_MAGIC = 0x534F434B
PIPEFS_MAGIC = 0x50495045
ANON_INODE_FS_MAGIC = 0x09041934
NSFS_MAGIC = 0x6E736673
DMA_BUF_MAGIC = 0x444D4142


class FdpHeader(ctypes.Structure):
    """struct fdp_event up to (not including) path[]."""

    _fields_ = [
        ("ktime_ns", ctypes.c_uint64),
        ("seq", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("sock_ino", ctypes.c_uint64),
        ("peer_sock_ino", ctypes.c_uint64),
        ("file_ino", ctypes.c_uint64),
        ("ret", ctypes.c_int64),
        ("transfer_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mntns_id", ctypes.c_uint32),
        ("pidns_id", ctypes.c_uint32),
        ("netns_id", ctypes.c_uint32),
        ("file_dev", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("sb_magic", ctypes.c_uint32),
        ("sock_fd", ctypes.c_int32),
        ("fd", ctypes.c_int32),
        ("fd_index", ctypes.c_uint16),
        ("fd_count", ctypes.c_uint16),
        ("msg_index", ctypes.c_uint16),
        ("i_mode", ctypes.c_uint16),
        ("path_len", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("syscall", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ncomp", ctypes.c_uint8),
        ("abi", ctypes.c_uint8),
        ("probe", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("comm", ctypes.c_char * FDP_COMM_LEN),
        ("parent_comm", ctypes.c_char * FDP_COMM_LEN),
    ]


class FdpEvent(ctypes.Structure):
    """The whole struct fdp_event (used for the layout check)."""

    _fields_ = [("header", FdpHeader), ("path", ctypes.c_char * FDP_PATH_BUF)]


HEADER_SIZE = ctypes.sizeof(FdpHeader)


def _struct_format(cls) -> str:
    """A struct-module format equal to a ctypes layout (explicit padding, no
    implicit alignment), so decoding is one unpack_from instead of one
    ctypes attribute access per field (~5x faster per record)."""
    codes = {ctypes.c_uint64: "Q", ctypes.c_int64: "q", ctypes.c_uint32: "I", ctypes.c_int32: "i",
             ctypes.c_uint16: "H", ctypes.c_uint8: "B"}
    fmt, pos = "<", 0
    for name, ctype in cls._fields_:
        field = getattr(cls, name)
        if field.offset > pos:
            fmt += f"{field.offset - pos}x"
        if name.startswith("_"):
            fmt += f"{field.size}x"
        elif ctype in codes:
            fmt += codes[ctype]
        else:  # char arrays
            fmt += f"{field.size}s"
        pos = field.offset + field.size
    return fmt


_HEADER = struct.Struct(_struct_format(FdpHeader))
assert _HEADER.size == HEADER_SIZE
Record = namedtuple("Record", [n for n, _ in FdpHeader._fields_ if not n.startswith("_")])


def decode_name(raw: bytes) -> str:
    """Kernel names are bytes; non-UTF-8 bytes become \\xNN so every path is valid UTF-8 text."""
    return raw.decode("utf-8", "backslashreplace")


def kernel_dev_to_st_dev(dev: int) -> int:
    """Kernel-internal dev_t (major << 20 | minor) to the st_dev stat(2) reports."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


def file_type(i_mode: int, sb_magic: int) -> str:
    if sb_magic == ANON_INODE_FS_MAGIC:
        return "ANON"
    fmt = stat.S_IFMT(i_mode)
    return {
        stat.S_IFREG: "REGULAR",
        stat.S_IFDIR: "DIRECTORY",
        stat.S_IFCHR: "CHAR",
        stat.S_IFBLK: "BLOCK",
        stat.S_IFIFO: "FIFO",
        stat.S_IFSOCK: "SOCKET",
        stat.S_IFLNK: "SYMLINK",
    }.get(fmt, "UNKNOWN")


def render_path(rec: Record, raw_path: bytes) -> str:
    """The path as the kernel prints it in /proc/PID/fd (d_path()).

    raw_path holds components leaf first, each NUL-terminated. A walk cut by
    a bound is rendered with a leading ".../" (and path_truncated set), never
    as a plausible absolute path."""
    comps = raw_path.split(b"\0")
    if comps and comps[-1] == b"":
        comps.pop()
    flags = rec.flags
    if flags & F_NO_FILE:
        return ""
    if flags & F_DNAME:
        name = decode_name(comps[0]) if comps else ""
        magic = rec.sb_magic
        if magic == SOCKFS_MAGIC:
            return f"socket:[{rec.file_ino}]"
        if magic == PIPEFS_MAGIC:
            return f"pipe:[{rec.file_ino}]"
        if magic == ANON_INODE_FS_MAGIC:
            return f"anon_inode:{name}"
        if magic == NSFS_MAGIC:
            return f"nsfs:[{rec.file_ino}]"
        if magic == DMA_BUF_MAGIC:
            return f"/{name}"
        # simple_dname(): memfd, shmem and other alloc_file_pseudo() files.
        return f"/{name} (deleted)"
    path = "/" + "/".join(decode_name(c) for c in reversed(comps))
    if flags & F_PATH_TRUNC:
        path = "..." + path
    if flags & F_DELETED:
        path += " (deleted)"
    return path


def decode_bytes(raw: bytes, _unpack=_HEADER.unpack_from, _make=Record._make) -> tuple[Record, bytes]:
    """One record copied out of the ring buffer -> (header, path bytes).
    Raises ValueError for a record shorter than its header.
    comm and parent_comm come back as the kernel's 16 bytes (NUL-padded)."""
    size = len(raw)
    if size < HEADER_SIZE:
        raise ValueError(f"kernel record of {size} bytes is shorter than its {HEADER_SIZE}-byte header")
    rec = _make(_unpack(raw))
    plen = min(rec.path_len, size - HEADER_SIZE)
    return rec, raw[HEADER_SIZE:HEADER_SIZE + plen]


def encode_bytes(rec: Record, path: bytes, _pack=_HEADER.pack) -> bytes:
    """decode_bytes() reversed: the record bytes of a header (changed with
    _replace) and its path, for the kernel backend's records completed in
    Python (collector/kernel_calls.py) to take the same encoders as any."""
    return _pack(*rec) + path


def decode(data: int, size: int, _string_at=ctypes.string_at) -> tuple[Record, bytes]:
    """decode_bytes() of a record at a C pointer (valid only during a callback)."""
    if size < HEADER_SIZE:
        raise ValueError(f"kernel record of {size} bytes is shorter than its {HEADER_SIZE}-byte header")
    return decode_bytes(_string_at(data, size))
