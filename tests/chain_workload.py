"""A real hand-off chain and a real fork, for `fdpass query chain`/`graph` tests and the README.

    python3 tests/chain_workload.py CHAIN_FILE FORK_FILE

chain: hop-a opens CHAIN_FILE and passes it to hop-b, hop-b to hop-c, hop-c to
hop-d; hop-d first moves to its own mount namespace (unshare CLONE_NEWNS).
fork:  fork-src opens FORK_FILE and passes it to fork-1, fork-2 and fork-3.
Each process names itself (prctl PR_SET_NAME); one line of JSON on stdout:
{role: {"pid": .., "mntns": .., "sock": inode of the socket it received or sent on}}.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15
CLONE_NEWNS = 0x00020000


def _child(role: str, report: int, body) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        libc.prctl(PR_SET_NAME, role.encode(), 0, 0, 0)
        if role == "hop-d" and libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        sock = body()
        info = {"pid": os.getpid(), "mntns": os.stat("/proc/self/ns/mnt").st_ino, "sock": sock}
        os.write(report, (json.dumps({role: info}) + "\n").encode())
    except BaseException as e:  # the parent reports a child that failed
        os.write(report, (json.dumps({role: {"error": repr(e)}}) + "\n").encode())
        code = 1
    os._exit(code)


def _pass_on(rx: socket.socket, tx: socket.socket | None):
    def body():
        _, fds, _, _ = socket.recv_fds(rx, 16, 4)
        rx.send(b"k")  # got it
        if tx is not None:
            socket.send_fds(tx, [b"x"], fds[:1])
            tx.recv(1)
        return os.fstat(rx.fileno()).st_ino
    return body


def _send(path: str, *txs: socket.socket):
    def body():
        fd = os.open(path, os.O_RDONLY)
        for tx in txs:
            socket.send_fds(tx, [b"x"], [fd])
            tx.recv(1)
        return os.fstat(txs[0].fileno()).st_ino
    return body


def main(chain_file: str, fork_file: str) -> None:
    r, w = os.pipe()
    ab, bc, cd = socket.socketpair(), socket.socketpair(), socket.socketpair()
    f1, f2, f3 = socket.socketpair(), socket.socketpair(), socket.socketpair()
    pids = [
        _child("hop-d", w, _pass_on(cd[1], None)),
        _child("hop-c", w, _pass_on(bc[1], cd[0])),
        _child("hop-b", w, _pass_on(ab[1], bc[0])),
        _child("hop-a", w, _send(chain_file, ab[0])),
        _child("fork-1", w, _pass_on(f1[1], None)),
        _child("fork-2", w, _pass_on(f2[1], None)),
        _child("fork-3", w, _pass_on(f3[1], None)),
        _child("fork-src", w, _send(fork_file, f1[0], f2[0], f3[0])),
    ]
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    out = {}
    with os.fdopen(r) as lines:
        for line in lines:
            out.update(json.loads(line))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
