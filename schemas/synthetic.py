"""Synthetic but realistic events, for tests and benchmarks (no kernel needed).

Values have the sizes real ones have (a 32-hex machine-id, a uuid boot_id,
kernel-style paths, 64-bit inode and namespace numbers), so encoded sizes and
timings match production's.
"""

from __future__ import annotations

from fdpass.schemas.fields import ABIS, DIRECTIONS, FILE_TYPES, SYSCALLS

_BOOT_ID = "4f7c1b2e-9d3a-4c55-8e61-0a2b3c4d5e6f"


def make_event(seq: int, host_id: str = "0123456789abcdef0123456789abcdef", host: str = "node-1") -> dict:
    """Event number `seq` of host `host_id`; deterministic, every field set."""
    direction = DIRECTIONS[seq % 2]
    return {
        "event_id": f"{host_id}:{_BOOT_ID}:{1_000_000_000 + seq * 1000}:{4242}:{direction}:0:{seq % 3}",
        "time_ns": 1_795_000_000_000_000_000 + seq * 1000,
        "host": host,
        "host_id": host_id,
        "boot_id": _BOOT_ID,
        "kernel": "6.18.0-fdpass",
        "direction": direction,
        "syscall": SYSCALLS[seq % 4],
        "pid": 4242,
        "tid": 4243 + seq % 7,
        "ppid": 1,
        "uid": 0,
        "gid": 0,
        "comm": "systemd-journal",
        "parent_comm": "systemd",
        "exe": "/usr/lib/systemd/systemd-journald" if seq % 5 else None,
        "mntns_id": 4026531841,
        "pidns_id": 4026531836,
        "netns_id": 4026531840,
        "cgroup_id": 6789 + seq % 11,
        "container_id": None if seq % 3 else "3f2a9c0b1d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcd",
        "sock_fd": 7,
        "sock_ino": 123456 + seq % 100,
        "peer_sock_ino": 123457 + seq % 100 if seq % 4 else None,
        "fd": 10 + seq % 20,
        "fd_index": seq % 3,
        "fd_count": 3,
        "file_path": f"/memfd:journal-{seq % 1000} (deleted)" if seq % 2 else "/etc/passwd",
        "file_ino": 98765 + seq,
        "file_dev": 2049,
        "file_type": FILE_TYPES[seq % len(FILE_TYPES)],
        "file_flags": 0o2 | 0o2000000,
        "ret": 1,
        "probe": "tracepoint",
        "msg_index": 0,
        "seq": seq,
        "path_truncated": False,
        "fds_truncated": False,
        "msg_ctrunc": False,
        "abi": ABIS[1] if seq % 10 == 9 else ABIS[0],  # now and then a 32-bit program
        "file_verified": seq % 4 != 3,
        # a SEND (even seq) and the RECV after it share their kernel SCM_RIGHTS list
        "transfer_id": None if seq % 6 == 5 else 0x10000 + seq // 2,
    }
