"""User-space cost per kernel record, in one run: decode alone, decode +
enrich into a contract event, and + JSON line / + Avro encoding, on
synthetic records laid out exactly as bpf/fdpass.h (no probes needed).
Prints records/s on one core for each stage and the ratio to decode alone.

    .venv/bin/python bench/bench_reader.py [--records N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time

from fdpass.collector import records as R
from fdpass.collector.enrich import Enricher


def synthetic(n_tasks: int = 8) -> list[tuple[ctypes.Array, int]]:
    out = []
    path = b"passwd\0etc\0"
    for t in range(n_tasks):
        h = R.FdpHeader()
        h.ktime_ns, h.pid, h.tid, h.ppid = time.monotonic_ns(), os.getpid(), os.getpid() + t, os.getppid()
        h.sock_ino, h.peer_sock_ino, h.file_ino, h.file_dev = 1000 + t, 2000 + t, 42, (8 << 20) | 1
        h.kind, h.direction, h.syscall, h.flags, h.i_mode = R.KIND_FD, 1 + t % 2, 1, R.F_PEER, 0o100644
        h.comm, h.parent_comm, h.path_len, h.fd_count = b"bench", b"bash", len(path), 1
        buf = ctypes.create_string_buffer(bytes(h) + path)
        out.append((buf, R.HEADER_SIZE + len(path)))
    return out


def rate(fn, recs, n: int) -> float:
    t0 = time.process_time()
    for i in range(n):
        buf, size = recs[i & 7]
        fn(ctypes.addressof(buf), size)
    return n / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    n = ap.parse_args().records
    from fdpass.schemas import codec

    recs = synthetic()
    enr = Enricher()
    decode, event, dumps, encode = R.decode, enr.event, json.dumps, codec.encode
    stages = {
        "decode": lambda d, s: decode(d, s),
        "decode+enrich": lambda d, s: event(*decode(d, s)),
        "decode+enrich+json": lambda d, s: dumps(event(*decode(d, s))),
        "decode+enrich+avro": lambda d, s: encode(event(*decode(d, s))),
    }
    base = None
    for name, fn in stages.items():
        r = rate(fn, recs, n)
        base = base or r
        print(f"{name:<20} {r:>10,.0f} records/s per core  ({r / base:.2f}x decode alone)")


if __name__ == "__main__":
    main()
