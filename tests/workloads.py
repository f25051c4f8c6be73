"""Raw socket calls Python's socket module does not offer (sendmmsg,
recvmmsg, sendmsg with arbitrary control bytes), through libc with ctypes,
so tests can make exactly the syscalls the probes trace."""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import os
import socket
import struct

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

SOL_SOCKET = socket.SOL_SOCKET
SCM_RIGHTS = socket.SCM_RIGHTS
CMSG_HDR = 16


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]


def cmsg(level: int, type_: int, data: bytes) -> bytes:
    """One control message, padded to 8 bytes like CMSG_SPACE."""
    raw = struct.pack("=Qii", CMSG_HDR + len(data), level, type_) + data
    return raw + b"\0" * (-len(raw) % 8)


def rights(fds) -> bytes:
    return cmsg(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds).tobytes())


class _Msg:
    """Keeps the buffers of one msghdr alive."""

    def __init__(self, payload: bytes, control: bytes | None, controllen: int | None = None, capacity: int = 0):
        self.data = ctypes.create_string_buffer(payload, max(len(payload), capacity, 1))
        self.iov = iovec(ctypes.cast(self.data, ctypes.c_void_p), max(len(payload), capacity))
        self.ctrl = ctypes.create_string_buffer(control, len(control)) if control else None
        self.hdr = msghdr()
        self.hdr.msg_iov = ctypes.pointer(self.iov)
        self.hdr.msg_iovlen = 1
        if self.ctrl is not None:
            self.hdr.msg_control = ctypes.cast(self.ctrl, ctypes.c_void_p)
            self.hdr.msg_controllen = len(control) if controllen is None else controllen


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def sendmsg_raw(sock: socket.socket, payload: bytes, control: bytes, controllen: int | None = None) -> int:
    """sendmsg(2) with control bytes exactly as given (may be garbage)."""
    m = _Msg(payload, control, controllen)
    return _check(libc.sendmsg(sock.fileno(), ctypes.byref(m.hdr), 0))


def sendmmsg(sock: socket.socket, messages: list[tuple[bytes, bytes | None]], flags: int = 0) -> int:
    keep = [_Msg(p, c) for p, c in messages]
    vec = (mmsghdr * len(keep))()
    for i, m in enumerate(keep):
        vec[i].msg_hdr = m.hdr
    return _check(libc.sendmmsg(sock.fileno(), vec, len(keep), flags))


def parse_rights(control: bytes) -> list[int]:
    fds, off = [], 0
    while off + CMSG_HDR <= len(control):
        length, level, type_ = struct.unpack_from("=Qii", control, off)
        if length < CMSG_HDR:
            break
        if level == SOL_SOCKET and type_ == SCM_RIGHTS:
            body = control[off + CMSG_HDR: off + length]
            fds.extend(array.array("i", body[: len(body) // 4 * 4]))
        off += (length + 7) & ~7
    return fds


def recvmmsg(sock: socket.socket, n: int, ctrl_size: int = 256, flags: int = 0) -> list[tuple[bytes, list[int], int]]:
    """Receive up to n messages: (data, received fds, msg_flags) each."""
    keep = [_Msg(b"", b"\0" * ctrl_size, capacity=1024) for _ in range(n)]
    vec = (mmsghdr * n)()
    for i, m in enumerate(keep):
        vec[i].msg_hdr = m.hdr
    got = _check(libc.recvmmsg(sock.fileno(), vec, n, flags, None))
    out = []
    for i in range(got):
        h = vec[i].msg_hdr
        control = ctypes.string_at(keep[i].ctrl, h.msg_controllen)
        out.append((keep[i].data.raw[: vec[i].msg_len], parse_rights(control), h.msg_flags))
    return out
