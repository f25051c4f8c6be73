"""Pure logic of the collector: record layout, BTF parsing, path rendering, enrichment."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time

import pytest

from fdpass.collector import records as R
from fdpass.collector.btf import BTF, BTFError
from fdpass.collector.enrich import WallClock, container_id_from_cgroup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_decoder_matches_the_c_header_layout(tmp_path):
    """Compile bpf/fdpass.h with the host compiler and compare every offset."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to check the record layout")
    names = [f[0] for f in R.FdpHeader._fields_ if not f[0].startswith("_")]
    prog = ['#include <stdio.h>', '#include <stddef.h>', '#include "fdpass.h"', "int main(void) {"]
    prog.append('printf("sizeof %zu\\n", sizeof(struct fdp_event));')
    prog.append('printf("path %zu\\n", offsetof(struct fdp_event, path));')
    for n in names:
        prog.append(f'printf("{n} %zu %zu\\n", offsetof(struct fdp_event, {n}), sizeof(((struct fdp_event*)0)->{n}));')
    prog.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(prog))
    subprocess.run([cc, "-I", os.path.join(REPO, "bpf"), "-o", str(tmp_path / "layout"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout
    c = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.splitlines()}
    assert c["sizeof"][0] == ctypes.sizeof(R.FdpEvent)
    assert c["path"][0] == R.HEADER_SIZE
    for n in names:
        field = getattr(R.FdpHeader, n)
        assert c[n] == [field.offset, field.size], n


def test_btf_offsets_of_this_kernel_and_missing_members():
    btf = BTF.load()
    assert btf.offsetof("dentry", "d_name.name") > btf.offsetof("dentry", "d_parent")
    assert btf.sizeof("upid") >= 12
    with pytest.raises(BTFError, match="no member"):
        btf.offsetof("dentry", "no_such_member")
    with pytest.raises(BTFError, match="not in this kernel"):
        btf.offsetof("no_such_struct_fdpass", "x")


def test_btf_rejects_garbage_and_missing_file(tmp_path):
    with pytest.raises(BTFError, match="bad magic"):
        BTF(b"\0" * 64)
    with pytest.raises(BTFError, match="no BTF"):
        BTF.load(str(tmp_path / "missing"))


def _rec(**kw) -> R.Record:
    return R.Record(**{name: kw.get(name, b"" if name in ("comm", "parent_comm") else 0) for name in R.Record._fields})


def test_decode_unpacks_what_ctypes_lays_out():
    """The struct-module decoder reads each field where the C layout puts it."""
    h = R.FdpHeader()
    for i, (name, ctype) in enumerate(R.FdpHeader._fields_):
        if name.startswith("_"):
            continue
        if name in ("comm", "parent_comm"):
            setattr(h, name, f"{name}-x".encode())
        else:
            setattr(h, name, (i * 7919) % 250 + 1)
    h.path_len = 4
    buf = ctypes.create_string_buffer(bytes(h) + b"a\0b\0")
    rec, raw = R.decode(ctypes.addressof(buf), R.HEADER_SIZE + 4)
    for name in R.Record._fields:
        want = getattr(h, name)
        got = getattr(rec, name)
        assert (got.rstrip(b"\0") if isinstance(got, bytes) else got) == want, name
    assert raw == b"a\0b\0"
    # encode_bytes is its inverse (the kernel backend's completed records go back to bytes)
    done = rec._replace(ret=5, sock_fd=3)
    assert R.decode_bytes(R.encode_bytes(done, raw)) == (done, raw)


@pytest.mark.parametrize(
    "kw, raw, want",
    [
        ({}, b"passwd\0etc\0", "/etc/passwd"),
        ({}, b"", "/"),
        ({"flags": R.F_DELETED}, b"x\0tmp\0", "/tmp/x (deleted)"),
        ({"flags": R.F_PATH_TRUNC}, b"c\0b\0", ".../b/c"),
        ({"flags": R.F_DNAME, "sb_magic": R.SOCKFS_MAGIC, "file_ino": 7}, b"\0", "socket:[7]"),
        ({"flags": R.F_DNAME, "sb_magic": R.PIPEFS_MAGIC, "file_ino": 9}, b"\0", "pipe:[9]"),
        ({"flags": R.F_DNAME, "sb_magic": R.ANON_INODE_FS_MAGIC}, b"[eventfd]\0", "anon_inode:[eventfd]"),
        ({"flags": R.F_DNAME, "sb_magic": 0x01021994}, b"memfd:a\0", "/memfd:a (deleted)"),
        ({"flags": R.F_NO_FILE}, b"", ""),
        ({}, b"n\xff\0", "/n\\xff"),
    ],
)
def test_render_path(kw, raw, want):
    assert R.render_path(_rec(**kw), raw) == want


def test_kernel_dev_to_st_dev():
    assert R.kernel_dev_to_st_dev((8 << 20) | 1) == os.makedev(8, 1)
    assert R.kernel_dev_to_st_dev((259 << 20) | 300) == os.makedev(259, 300)


def test_decode_rejects_short_records():
    buf = ctypes.create_string_buffer(10)
    with pytest.raises(ValueError, match="shorter"):
        R.decode(ctypes.addressof(buf), 10)


@pytest.mark.parametrize(
    "text, want",
    [
        ("0::/system.slice/docker-" + "a" * 64 + ".scope", "a" * 64),
        ("0::/kubepods/besteffort/pod1/" + "b" * 64, "b" * 64),
        ("0::/system.slice/cri-containerd-" + "c" * 64 + ".scope", "c" * 64),
        ("0::/user.slice/user-0.slice/session-1.scope", None),
        ("", None),
    ],
)
def test_container_id_from_cgroup(text, want):
    assert container_id_from_cgroup(text) == want


def test_wall_clock_converts_monotonic_to_utc():
    import time

    clock = WallClock()
    now_mono = time.monotonic_ns()
    assert abs(clock.to_wall(now_mono) - time.time_ns()) < 50_000_000


def test_run_ids_count_up_per_load_and_wrap(tmp_path):
    from fdpass.collector.probes import next_run_id

    path = str(tmp_path / "run" / "loads")
    assert [next_run_id(path) for _ in range(3)] == [1, 2, 3]
    with open(path, "w") as f:
        f.write("16383")
    # 14 bits counted, the 15th marks a handover (collector/handover.py): seq = run << 48 | n stays a valid Avro long
    assert next_run_id(path) == 0


def test_largest_seq_still_encodes():
    from fdpass.collector.probes import RUN_ID_MASK
    from fdpass.schemas import codec
    from fdpass.schemas.synthetic import make_event

    e = make_event(1)
    e["seq"] = (RUN_ID_MASK << 48) | ((1 << 48) - 1)
    assert codec.decode(codec.encode(e))["seq"] == e["seq"]


def test_hostname_override(monkeypatch):
    from fdpass.collector.enrich import HostInfo

    monkeypatch.setenv("FDPASS_HOSTNAME", "node-7")
    assert HostInfo().host == "node-7"
    monkeypatch.delenv("FDPASS_HOSTNAME")
    assert HostInfo().host == __import__("socket").gethostname()


def _header_defines() -> dict[str, int]:
    import re

    text = open(os.path.join(REPO, "bpf", "fdpass.h")).read()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"#define (FDP_\w+)\s+(0x[0-9a-fA-F]+|\d+)", text)}


def test_record_constants_match_the_c_header():
    """Every FDP_* kind, direction, syscall, abi, probe, flag and stat index the
    header defines is the value records.py and probes.py decode it as."""
    from fdpass.collector.probes import STAT_NAMES

    d = _header_defines()
    names = {"FDP_DIR_": R.DIRECTIONS, "FDP_ABI_": R.ABIS, "FDP_PROBE_": R.PROBES}
    for prefix, table in names.items():
        consts = {v: k[len(prefix):] for k, v in d.items() if k.startswith(prefix)}
        assert set(consts) == set(table), prefix
        for value, name in consts.items():
            assert table[value].replace("_", "").lower() == name.replace("_", "").lower(), (prefix, value)
    syscalls = {v: k for k, v in d.items() if k.startswith("FDP_SYS_")}
    assert set(syscalls) == set(R.SYSCALLS)
    for value, const in syscalls.items():
        assert R.SYSCALLS[value].replace("IO_URING_", "URING_") == const[len("FDP_SYS_"):], const
    assert (d["FDP_KIND_FD"], d["FDP_KIND_LOSS"]) == (R.KIND_FD, R.KIND_LOSS)
    assert (d["FDP_KIND_MSG_END"], d["FDP_KIND_CALL_END"]) == (R.KIND_MSG_END, R.KIND_CALL_END)
    # the short RECV and the bounds both sides of "receives reuse the send's walk" rely on
    assert (d["FDP_KIND_FD_SAME"], d["FDP_SAME_SPAN"], d["FDP_SAME_FDS"]) == (R.KIND_FD_SAME, R.SAME_SPAN, R.SAME_FDS)
    assert d["FDP_PROBE_FENTRY"] == R.PROBE_FENTRY
    flags = {k[len("FDP_F_"):]: v for k, v in d.items() if k.startswith("FDP_F_")}
    assert flags == {n[len("F_"):]: getattr(R, n) for n in dir(R) if n.startswith("F_") and n[2:] in flags} and \
        len(flags) == len([n for n in dir(R) if n.startswith("F_")])
    stats = sorted((v, k) for k, v in d.items() if k.startswith("FDP_STAT_") and k != "FDP_STAT_N")
    assert [v for v, _ in stats] == list(range(d["FDP_STAT_N"])) and len(STAT_NAMES) == d["FDP_STAT_N"]


def _krec(**kw) -> R.Record:
    return _rec(probe=R.PROBE_FENTRY, **kw)


def test_kernel_calls_hold_fd_records_until_the_call_ends():
    """The in-kernel backend's FD records come out completed by their message's
    and call's end, and only for messages that got through in a call that did."""
    from fdpass.collector.kernel_calls import KernelCalls

    calls = KernelCalls()
    fd = lambda tid, msg, i: _krec(kind=R.KIND_FD, tid=tid, msg_index=msg, fd_index=i, fd=10 + i, flags=R.F_VERIFIED)
    end = lambda tid, msg, n, ok: _krec(kind=R.KIND_MSG_END, tid=tid, msg_index=msg, fd_count=n, fd_index=ok,
                                       sock_ino=7, peer_sock_ino=8, flags=R.F_PEER)
    call = lambda tid, ret, sys=1: _krec(kind=R.KIND_CALL_END, tid=tid, syscall=sys, abi=2, sock_fd=3, ret=ret)
    assert calls.add(fd(1, 0, 0), b"") == [] and calls.add(fd(1, 0, 1), b"") == []
    assert calls.add(end(1, 0, 2, 1), b"") == []
    out = [r for r, _ in calls.add(call(1, 5), b"")]
    assert [(r.fd, r.fd_index, r.fd_count, r.sock_ino, r.peer_sock_ino, r.syscall, r.abi, r.sock_fd, r.ret) for r in out] \
        == [(10, 0, 2, 7, 8, 1, 2, 3, 5), (11, 1, 2, 7, 8, 1, 2, 3, 5)]
    assert all(r.flags == R.F_VERIFIED | R.F_PEER for r in out)
    # a failed message (peer shut down), then a failed call: nothing comes out
    calls.add(fd(2, 0, 0), b"")
    calls.add(end(2, 0, 1, 0), b"")
    assert calls.add(call(2, 1), b"") == []
    calls.add(fd(3, 0, 0), b"")
    calls.add(end(3, 0, 1, 1), b"")
    assert calls.add(call(3, -32), b"") == []
    # sendmmsg returning 1: the second message's files were taken but it was not sent
    calls.add(fd(4, 0, 0), b"")
    calls.add(end(4, 0, 1, 1), b"")
    calls.add(fd(4, 1, 0), b"")
    calls.add(end(4, 1, 1, 1), b"")
    assert [r.msg_index for r, _ in calls.add(call(4, 1, sys=2), b"")] == [0]
    assert calls.failed_dropped == 3 and not calls.calls
    # one record per single-message call: the CALL_END carries its message's end (fd_count > 0)
    both = lambda tid, ret, ok: _krec(kind=R.KIND_CALL_END, tid=tid, syscall=1, abi=2, sock_fd=3, ret=ret,
                                      msg_index=0, fd_count=1, fd_index=ok, sock_ino=7, peer_sock_ino=8,
                                      flags=R.F_PEER | R.F_CTRUNC)
    calls.add(fd(5, 0, 0), b"")
    out = [r for r, _ in calls.add(both(5, 1, 1), b"")]
    assert [(r.fd, r.fd_count, r.sock_ino, r.peer_sock_ino, r.ret, r.flags) for r in out] \
        == [(10, 1, 7, 8, 1, R.F_VERIFIED | R.F_PEER | R.F_CTRUNC)]
    calls.add(fd(6, 0, 0), b"")
    assert calls.add(both(6, 0, 0), b"") == []  # its fds did not reach the peer (0-byte stream send)
    # sendmmsg: the first message's MSG_END, the second's end in the CALL_END
    calls.add(fd(7, 0, 0), b"")
    calls.add(end(7, 0, 1, 1), b"")
    calls.add(fd(7, 1, 0), b"")
    last = _krec(kind=R.KIND_CALL_END, tid=7, syscall=2, abi=2, sock_fd=3, ret=2, msg_index=1, fd_count=1,
                 fd_index=1, sock_ino=9, peer_sock_ino=8, flags=R.F_PEER)
    assert [(r.msg_index, r.sock_ino) for r, _ in calls.add(last, b"")] == [(0, 7), (1, 9)]
    assert calls.failed_dropped == 4 and not calls.calls
    # calls whose end never comes are bounded and counted
    small = KernelCalls(max_threads=2)
    for tid in (1, 2, 3):
        small.add(fd(tid, 0, 0), b"")
    assert small.unfinished_dropped == 1 and list(small.calls) == [2, 3]


def test_kernel_calls_complete_a_short_recv_from_its_send_record():
    """A RECV in the short form (KIND_FD_SAME) comes out with its SEND record's
    file fields and path, its own fd, task and open flags, and the receive's
    FDP_F_DELETED (not for pseudo files); a SEND SAME_SPAN transfer ids later
    forgets the older ones, and a short RECV whose SEND is not kept is counted, not guessed."""
    from fdpass.collector.kernel_calls import KernelCalls

    calls = KernelCalls()
    run = 3 << 48
    send = lambda tid, xid, i, **kw: _krec(kind=R.KIND_FD, direction=R.DIR_SEND, tid=tid, transfer_id=run | xid,
                                           fd_index=i, fd=10 + i, file_ino=100 + i, file_dev=7, i_mode=0o100644,
                                           sb_magic=0xEF53, ncomp=2, path_len=8, file_flags=2,
                                           flags=R.F_VERIFIED | kw.pop("flags", 0), **kw)
    short = lambda tid, xid, i, flags=0: _krec(kind=R.KIND_FD_SAME, direction=R.DIR_RECV, tid=tid,
                                               transfer_id=run | xid, fd_index=i, fd=20 + i, file_flags=0o4002,
                                               pid=tid, flags=R.F_VERIFIED | flags)
    ok = lambda tid, sys: _krec(kind=R.KIND_CALL_END, tid=tid, syscall=sys, ret=1, msg_index=0, fd_count=2,
                                fd_index=1, sock_ino=5)
    calls.add(send(1, 0, 0), b"a\0tmp\0")
    calls.add(send(1, 0, 1, flags=R.F_DNAME | R.F_PATH_TRUNC), b"pipe:\0")
    calls.add(short(2, 0, 0, flags=R.F_DELETED), b"")
    calls.add(short(2, 0, 1, flags=R.F_DELETED), b"")
    out = calls.add(ok(2, 3), b"")
    assert [(r.kind, r.direction, r.fd, r.fd_index, r.file_ino, r.file_dev, r.i_mode, r.sb_magic, r.ncomp,
             r.path_len, r.file_flags, r.pid, r.flags, p) for r, p in out] == [
        (R.KIND_FD, R.DIR_RECV, 20, 0, 100, 7, 0o100644, 0xEF53, 2, 8, 0o4002, 2, R.F_VERIFIED | R.F_DELETED,
         b"a\0tmp\0"),
        (R.KIND_FD, R.DIR_RECV, 21, 1, 101, 7, 0o100644, 0xEF53, 2, 8, 0o4002, 2,
         R.F_VERIFIED | R.F_DNAME | R.F_PATH_TRUNC, b"pipe:\0")]
    assert calls.recv_reused == 2 and calls.recv_unresolved == 0
    # kept until a SEND record SAME_SPAN ids later: one id below that, still there
    calls.add(send(1, R.SAME_SPAN - 1, 0), b"b\0")
    calls.add(short(3, 0, 0), b"")
    assert calls.recv_reused == 3 and len(calls.calls[3].fds) == 1
    calls.add(send(1, R.SAME_SPAN, 0), b"c\0")
    assert run | 0 not in calls.sent and run | R.SAME_SPAN in calls.sent
    calls.add(short(4, 0, 0), b"")  # cannot happen by the kernel's rule; never completed from a guess
    assert calls.recv_unresolved == 1 and 4 not in calls.calls
    calls.add(short(4, R.SAME_SPAN, 1), b"")  # an fd position its SEND did not leave
    assert calls.recv_unresolved == 2
    # two SEND records claiming one transfer's position: neither is trusted
    calls.add(send(1, R.SAME_SPAN + 1, 0), b"d\0")
    calls.add(send(5, R.SAME_SPAN + 1, 0), b"e\0")
    calls.add(short(4, R.SAME_SPAN + 1, 0), b"")
    assert calls.recv_unresolved == 3 and 4 not in calls.calls


def test_bpf_program_map_picture_is_current():
    """docs/bpf-programs.md is generated from the BPF source: regenerate it
    (python -m fdpass.collector.bpfmap) when the probes change."""
    from fdpass.collector import bpfmap

    assert bpfmap.main(["--check"]) == 0


def test_bpf_program_map_scanner_follows_helpers_and_tail_calls():
    from fdpass.collector import bpfmap

    unit = bpfmap.scan(bpfmap.BPF_DIR / "fdpass.bpf.c")
    # the exit probe reaches the pending map through take_pending(), the walker emits
    exit_ops = bpfmap.map_ops(unit, "tracepoint syscalls:sys_exit_sendmsg")
    assert ("pending_spill", "delete") in exit_ops and ("progs", "tail call") in exit_ops
    assert ("events", "emit") in bpfmap.map_ops(unit, "walk")
    assert bpfmap.tail_targets(bpfmap.LOADER.read_text())["progs"] == "walk"
    # the kernel backend's file is in the picture too: the sender's fd is emitted where fget_raw returns
    kernel = bpfmap.scan(bpfmap.BPF_DIR / "fdpass_kernel.bpf.c")
    assert ("events", "emit") in bpfmap.map_ops(kernel, "fexit fget_raw")
    assert ("kcall_spill", "delete") in bpfmap.map_ops(kernel, "fexit __sys_sendmsg")
    assert "## fdpass_kernel.bpf.c" in bpfmap.generate()


@pytest.mark.parametrize("syscall", sorted(R.SYSCALLS))
def test_enrichment_builds_every_contract_field_in_order(syscall):
    """Every field of schemas/fields.py comes out of enrichment, in contract
    order, with a value the Avro codec accepts: a field forgotten in
    collector/enrich.py fails here, without root or probes. Every kernel
    syscall, abi and probe code maps to a symbol the contract knows."""
    from fdpass.collector.enrich import Enricher
    from fdpass.schemas import codec
    from fdpass.schemas.fields import ENUMS, FIELD_NAMES

    rec = _rec(kind=R.KIND_FD, direction=2, syscall=syscall, abi=max(R.ABIS), probe=max(R.PROBES), pid=os.getpid(),
               tid=os.getpid(), comm=b"t", flags=R.F_PEER | R.F_VERIFIED, transfer_id=7, i_mode=0o100644, fd=3,
               fd_count=1, ktime_ns=time.monotonic_ns())
    event = Enricher().event(rec, b"passwd\0etc\0")
    assert list(event) == list(FIELD_NAMES)
    assert event["syscall"] in ENUMS["syscall"] and event["abi"] in ENUMS["abi"]
    assert (event["file_verified"], event["transfer_id"], event["file_path"]) == (True, 7, "/etc/passwd")
    assert codec.decode(codec.encode(event)) == event
    assert set(R.SYSCALLS.values()) <= set(ENUMS["syscall"]) and set(R.ABIS.values()) == set(ENUMS["abi"])


def test_the_final_drain_takes_every_record_at_the_pace_the_output_makes_room():
    """Stopping with a full ring buffer: the last drain reads to its end, but hands the output a batch only
    while the output does not hold, so `run`'s queue never holds the whole ring buffer at once (its RSS)."""
    from fdpass.collector.collect import Collector
    from fdpass.collector.probes import READ_BATCH

    class Ring:  # the reader's side of the kernel ring buffer: at most READ_BATCH records per read
        def __init__(self, n):
            self.left = n

        def read(self, timeout_ms=0, max_records=READ_BATCH):
            k = min(self.left, max_records)
            self.left -= k
            return [b"r"] * k

    queue, peak = [], [0]

    def handle(records):
        queue.extend(records)
        peak[0] = max(peak[0], len(queue))

    def hold():
        if len(queue) >= 2 * READ_BATCH:
            del queue[:READ_BATCH]  # the store writer takes a batch while the collector waits
            return True
        return False

    c = Collector.__new__(Collector)  # the drain loop alone: no probes loaded
    c.probes, c.hold, c._handle = Ring(10 * READ_BATCH + 5), hold, handle
    c.drain(0, final=True)
    assert c.probes.left == 0
    assert peak[0] == 2 * READ_BATCH


def test_cpu_summary_is_the_process_cpu_since_the_start_per_event():
    from fdpass.collector.collect import cpu_summary, process_cpu_seconds

    start = process_cpu_seconds()
    while process_cpu_seconds() - start < 0.05:  # burn at least 50 ms of CPU
        pass
    s = cpu_summary(start, {"events_send": 1000, "events_recv": 1000})
    assert s["cpu_seconds"] >= 0.05
    assert s["cpu_us_per_event"] == pytest.approx((process_cpu_seconds() - start) / 2000 * 1e6, rel=0.5)
    assert cpu_summary(start, {"events_send": 0, "events_recv": 0})["cpu_us_per_event"] == 0
