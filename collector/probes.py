"""Load one of fdpass's two capture backends with bcc, with kernel struct offsets from BTF.

- "kernel": bpf/fdpass_kernel.bpf.c, fentry/fexit on the kernel functions
  that move the files (exact, every entry point); where the kernel allows it.
- "tracepoint": bpf/fdpass.bpf.c, syscall, raw_syscalls and io_uring
  tracepoints; runs wherever BTF and tracepoints exist.

The BPF C reads every kernel struct member at OFF_* byte offsets; this
module is where they come from (the running kernel's BTF, never headers),
where the kernel functions the kernel backend hooks are checked against
BTF, and where the compiled programs are attached and the ring buffer drained.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import time
from dataclasses import dataclass
from importlib import resources

from fdpass.collector.btf import BTF, BTFError
from fdpass.errors import UserError

try:
    from fdpass.collector import _capture
except ImportError:  # built without a C compiler (setup.py): bcc's per-record callback does the reading
    _capture = None

# -D name -> (struct, member path) in the running kernel's BTF.
OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_TASK_PID": ("task_struct", "pid"),
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_TASK_COMM": ("task_struct", "comm"),
    "OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_TASK_FS": ("task_struct", "fs"),
    "OFF_TASK_NSPROXY": ("task_struct", "nsproxy"),
    "OFF_TASK_THREAD_PID": ("task_struct", "thread_pid"),
    "OFF_PID_LEVEL": ("pid", "level"),
    "OFF_PID_NUMBERS": ("pid", "numbers"),
    "OFF_UPID_NS": ("upid", "ns"),
    "OFF_PID_NAMESPACE_INUM": ("pid_namespace", "ns.inum"),
    "OFF_NSPROXY_MNT_NS": ("nsproxy", "mnt_ns"),
    "OFF_NSPROXY_NET_NS": ("nsproxy", "net_ns"),
    "OFF_MNT_NAMESPACE_INUM": ("mnt_namespace", "ns.inum"),
    "OFF_NET_INUM": ("net", "ns.inum"),
    "OFF_FS_ROOT": ("fs_struct", "root"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDTABLE_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDTABLE_FD": ("fdtable", "fd"),
    "OFF_FILE_F_PATH": ("file", "f_path"),
    "OFF_FILE_F_INODE": ("file", "f_inode"),
    "OFF_FILE_F_FLAGS": ("file", "f_flags"),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "OFF_INODE_I_MODE": ("inode", "i_mode"),
    "OFF_INODE_I_INO": ("inode", "i_ino"),
    "OFF_INODE_I_SB": ("inode", "i_sb"),
    "OFF_SUPER_BLOCK_S_DEV": ("super_block", "s_dev"),
    "OFF_SUPER_BLOCK_S_MAGIC": ("super_block", "s_magic"),
    "OFF_DENTRY_D_HASH_PPREV": ("dentry", "d_hash.pprev"),
    "OFF_DENTRY_D_PARENT": ("dentry", "d_parent"),
    "OFF_DENTRY_D_NAME_NAME": ("dentry", "d_name.name"),
    "OFF_DENTRY_D_OP": ("dentry", "d_op"),
    "OFF_DENTRY_OPERATIONS_D_DNAME": ("dentry_operations", "d_dname"),
    "OFF_VFSMOUNT_MNT_ROOT": ("vfsmount", "mnt_root"),
    "OFF_MOUNT_MNT": ("mount", "mnt"),
    "OFF_MOUNT_MNT_PARENT": ("mount", "mnt_parent"),
    "OFF_MOUNT_MNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
    "OFF_SOCKET_TYPE": ("socket", "type"),
    "OFF_SOCKET_SK": ("socket", "sk"),
    "OFF_SOCKET_ALLOC_VFS_INODE": ("socket_alloc", "vfs_inode"),
    "OFF_SOCK_FAMILY": ("sock", "__sk_common.skc_family"),
    "OFF_SOCK_SK_SOCKET": ("sock", "sk_socket"),
    "OFF_UNIX_SOCK_PEER": ("unix_sock", "peer"),
    "OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    # Verification: the SCM_RIGHTS list on the queued skb (docs/kernel.md)
    "OFF_SOCK_SK_RECEIVE_QUEUE": ("sock", "sk_receive_queue"),
    "OFF_SK_BUFF_NEXT": ("sk_buff", "next"),
    "OFF_SK_BUFF_PREV": ("sk_buff", "prev"),
    "OFF_SK_BUFF_SK": ("sk_buff", "sk"),
    "OFF_SK_BUFF_CB": ("sk_buff", "cb"),
    "OFF_UNIX_SKB_PARMS_FP": ("unix_skb_parms", "fp"),
    "OFF_SCM_FP_LIST_COUNT": ("scm_fp_list", "count"),
    "OFF_SCM_FP_LIST_FP": ("scm_fp_list", "fp"),
}
SIZES: dict[str, str] = {"SIZEOF_UPID": "upid"}

# Compat (32-bit) calls: the task's TS_COMPAT bit and the syscall arguments in pt_regs (x86).
COMPAT_OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_TASK_TI_STATUS": ("task_struct", "thread_info.status"),
    "OFF_PT_REGS_BX": ("pt_regs", "bx"),
    "OFF_PT_REGS_CX": ("pt_regs", "cx"),
    "OFF_PT_REGS_DX": ("pt_regs", "dx"),
    "OFF_PT_REGS_SI": ("pt_regs", "si"),
    "OFF_PT_REGS_DI": ("pt_regs", "di"),
    "OFF_PT_REGS_R10": ("pt_regs", "r10"),
}
# io_uring requests (io_uring/ in the kernel): the request, its socket and user msghdr.
URING_OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_IO_KIOCB_CMD": ("io_kiocb", "cmd"),
    "OFF_IO_KIOCB_CTX": ("io_kiocb", "ctx"),
    "OFF_IO_KIOCB_FLAGS": ("io_kiocb", "flags"),
    "OFF_IO_KIOCB_CQE": ("io_kiocb", "cqe"),
    "OFF_IO_CQE_FD": ("io_cqe", "fd"),
    "OFF_IO_SR_MSG_UMSG": ("io_sr_msg", "umsg"),
    "OFF_IO_SR_MSG_MSG_FLAGS": ("io_sr_msg", "msg_flags"),
}
URING_OPS = {"IORING_OP_SENDMSG_": "IORING_OP_SENDMSG", "IORING_OP_RECVMSG_": "IORING_OP_RECVMSG"}
URING_OPTIONAL_OPS = {"IORING_OP_SENDMSG_ZC_": "IORING_OP_SENDMSG_ZC"}  # Linux 6.1+
# The submit tracepoint is io_uring_submit_sqe on Linux 6.0-6.3 and io_uring_submit_req after.
URING_SUBMIT = ("io_uring:io_uring_submit_req", "io_uring:io_uring_submit_sqe")
URING_COMPLETE = "io_uring:io_uring_complete"

# The kernel backend: offsets beyond OFFSETS, and the functions it hooks with
# their parameters as BTF names them (fentry/fexit read arguments by position,
# so a kernel whose parameters differ is refused rather than misread).
KERNEL_OFFSETS: dict[str, tuple[str, str]] = {
    "OFF_SCM_COOKIE_FP": ("scm_cookie", "fp"),
    "OFF_MSGHDR_MSG_FLAGS": ("msghdr", "msg_flags"),
    "OFF_TASK_FLAGS": ("task_struct", "flags"),
    "OFF_TASK_TI_STATUS": COMPAT_OFFSETS["OFF_TASK_TI_STATUS"],
}
KERNEL_URING_OFFSETS: dict[str, tuple[str, str]] = {
    **{k: URING_OFFSETS[k] for k in ("OFF_IO_KIOCB_CTX", "OFF_IO_KIOCB_FLAGS", "OFF_IO_KIOCB_CQE", "OFF_IO_CQE_FD")},
    "OFF_IO_CQE_RES": ("io_cqe", "res"),
}
KERNEL_FUNCS: dict[str, list[str]] = {
    "__scm_send": ["sock", "msg", "p"],
    "fget_raw": ["fd"],
    "scm_fp_dup": ["fpl"],
    "scm_detach_fds": ["msg", "scm"],
    "unix_stream_sendmsg": ["sock", "msg", "len"],
    "unix_dgram_sendmsg": ["sock", "msg", "len"],
    "unix_stream_recvmsg": ["sock", "msg", "size", "flags"],
    "__unix_dgram_recvmsg": ["sk", "msg", "size", "flags"],
    "__sys_sendmsg": ["fd", "msg", "flags", "forbid_cmsg_compat"],
    "__sys_sendmmsg": ["fd", "mmsg", "vlen", "flags", "forbid_cmsg_compat"],
    "__sys_recvmsg": ["fd", "msg", "flags", "forbid_cmsg_compat"],
    "do_recvmmsg": ["fd", "mmsg", "vlen", "flags", "timeout"],
}
# scm_detach_fds installs each file with __receive_fd(file, ufd, o_flags) on
# Linux 5.13-6.6 (receive_fd(file, o_flags) is pidfd_getfd's there) and with
# receive_fd(file, ufd, o_flags) after: RECEIVE_FD_HOOK 1 or 0.
RECEIVE_FD = (("__receive_fd", 1), ("receive_fd", 0))
RECEIVE_FD_PARAMS = ["file", "ufd", "o_flags"]
KERNEL_URING_FUNCS = {"io_sendmsg": ["req", "issue_flags"], "io_recvmsg": ["req", "issue_flags"]}
KERNEL_URING_ZC = "io_sendmsg_zc"
# The seqlocks every path change takes (d_move: rename_lock; mount tree: mount_lock), read by
# the kernel backend so a receive may reuse its send's path walk (docs/kernel.md, "Receives
# reuse the send's walk"). Not in BTF (only per-CPU variables are): /proc/kallsyms has them
# where the kernel lists data symbols (CONFIG_KALLSYMS_ALL, as Debian's does).
VFS_LOCKS = {"RENAME_LOCK": "rename_lock", "MOUNT_LOCK": "mount_lock"}
KALLSYMS = "/proc/kallsyms"
BACKENDS = ("auto", "kernel", "tracepoint")

TRACEPOINTS = tuple(
    f"syscalls:sys_{phase}_{call}"
    for call in ("sendmsg", "sendmmsg", "recvmsg", "recvmmsg")
    for phase in ("enter", "exit")
)

# A record of a short path takes ~192 bytes of ring buffer (168-byte header,
# the path's components, the ring's 8-byte record header, 8-byte aligned):
# 64 MiB of locked kernel memory holds ~350k, what `run` needs when its store
# falls behind (it then stops reading: fdpass/run.py). Measured on a busy
# 2-core VM at 150k events/s, 16 MiB lost 2% there and 64 MiB nothing.
RECORD_BYTES = 192
DEFAULT_RINGBUF_PAGES = 16384

# Records per read: ~2-4 MB of copies, a few ms of work; the ring buffer is
# released batch by batch, so it never waits long for its space.
READ_BATCH = 16384

# Indices of the BPF `stats` array (FDP_STAT_* in bpf/fdpass.h).
STAT_NAMES = ("events", "ringbuf_drops", "pending_full", "budget_exhausted", "pending_spilled", "uring_full",
              "uring_unseen")


def _tracepoint_exists(name: str) -> bool:
    group, event = name.split(":")
    return any(os.path.isdir(f"{root}/events/{group}/{event}")
               for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))


@dataclass
class Coverage:
    """Which capture paths the probes cover on this kernel, and why not where not."""
    compat: str | None = None  # None: covered; else the reason it is not
    io_uring: str | None = None
    io_uring_zc: str | None = None


def _compat_defines(btf: BTF) -> tuple[dict[str, int], str | None]:
    try:
        return {name: btf.offsetof(s, m) for name, (s, m) in COMPAT_OFFSETS.items()}, None
    except BTFError as e:
        return {}, f"not x86 compat layout ({e})"


def _uring_fixed_file_defines(btf: BTF) -> dict[str, int]:
    """Where a ring's registered-file table keeps slot i's file: an array of
    resource nodes on newer kernels (6.18 here), of io_fixed_file on older ones
    (6.1 here) (bpf/fdpass.bpf.c, uring_fixed_file)."""
    out = {"OFF_IO_RING_CTX_FILE_TABLE": btf.offsetof("io_ring_ctx", "file_table")}
    if btf.has_member("io_file_table", "data"):
        out.update(URING_FIXED_NODES=1, OFF_IO_FILE_TABLE_DATA=btf.offsetof("io_file_table", "data"),
                   OFF_IO_RSRC_DATA_NR=btf.offsetof("io_rsrc_data", "nr"),
                   OFF_IO_RSRC_DATA_NODES=btf.offsetof("io_rsrc_data", "nodes"),
                   OFF_IO_RSRC_NODE_FILE_PTR=btf.offsetof("io_rsrc_node", "file_ptr"))
    else:
        if btf.offsetof("io_fixed_file", "file_ptr") != 0 or btf.sizeof("io_fixed_file") != 8:
            raise BTFError("struct io_fixed_file is not { file_ptr } on this kernel")
        out.update(URING_FIXED_NODES=0, OFF_IO_FILE_TABLE_FILES=btf.offsetof("io_file_table", "files"),
                   OFF_IO_RING_CTX_NR_USER_FILES=btf.offsetof("io_ring_ctx", "nr_user_files"))
    return out


def _uring_defines(btf: BTF) -> tuple[dict[str, int], str | None, str | None]:
    submit = [t for t in URING_SUBMIT if _tracepoint_exists(t)]
    if not submit or not _tracepoint_exists(URING_COMPLETE):
        return {}, "io_uring tracepoints missing (kernel without io_uring, or older than 6.0)", "no io_uring"
    try:
        out = {name: btf.offsetof(s, m) for name, (s, m) in URING_OFFSETS.items()}
        out["URING_SUBMIT_SQE"] = int(submit[0].endswith("_sqe"))
        bit = btf.bit_offsetof("io_ring_ctx", "compat")
        out["OFF_IO_RING_CTX_COMPAT_BYTE"], out["OFF_IO_RING_CTX_COMPAT_BIT"] = bit // 8, bit % 8
        out.update({name: btf.enum_value(e) for name, e in URING_OPS.items()})
        out.update(_uring_fixed_file_defines(btf))
        out["REQ_F_CQE_SKIP_"] = 1 << btf.enum_value("REQ_F_CQE_SKIP_BIT")
    except BTFError as e:
        return {}, f"io_uring layout not understood: {e}", "no io_uring"
    zc = None
    for name, e in URING_OPTIONAL_OPS.items():
        try:
            out[name] = btf.enum_value(e)
        except BTFError:
            zc = f"{e} is not in this kernel"
    return out, None, zc


def kernel_defines(btf: BTF) -> tuple[dict[str, int], Coverage]:
    """Every OFF_*/SIZEOF_* the BPF C needs, from this kernel's BTF, and the
    capture paths they make possible (COMPAT=0 / URING=0 leave a path out)."""
    # The C reads a struct path as {mnt, dentry} in one go.
    if (btf.offsetof("path", "mnt"), btf.offsetof("path", "dentry")) != (0, 8):
        raise BTFError("struct path is not {mnt, dentry} on this kernel; fdpass does not support it yet")
    out = {name: btf.offsetof(s, m) for name, (s, m) in OFFSETS.items()}
    out.update({name: btf.sizeof(s) for name, s in SIZES.items()})
    cov = Coverage()
    compat, cov.compat = _compat_defines(btf)
    out.update(compat)
    out["COMPAT"] = int(cov.compat is None)
    uring, cov.io_uring, cov.io_uring_zc = _uring_defines(btf)
    out.update(uring)
    out["URING"] = int(cov.io_uring is None)
    return out, cov


def kernel_plan(btf: BTF) -> tuple[dict[str, int], list[str]]:
    """-D values of bpf/fdpass_kernel.bpf.c for this kernel and the functions it
    hooks; BTFError when a function or offset it needs is missing or has
    other parameters (the kernel backend cannot run here)."""
    for fn, params in KERNEL_FUNCS.items():
        got = btf.func_params(fn)
        if got != params:
            raise BTFError(f"kernel function {fn}({', '.join(params)}) is "
                           + ("not in BTF (inlined or absent)" if got is None else f"{fn}({', '.join(got)}) here"))
    hooks = list(KERNEL_FUNCS)
    out = {name: btf.offsetof(s, m) for name, (s, m) in OFFSETS.items()}
    out.update({name: btf.sizeof(s) for name, s in SIZES.items()})
    out.update({name: btf.offsetof(s, m) for name, (s, m) in KERNEL_OFFSETS.items()})
    for fn, flag in RECEIVE_FD:
        if btf.func_params(fn) == RECEIVE_FD_PARAMS:
            out["RECEIVE_FD_HOOK"] = flag
            hooks.append(fn)
            break
    else:
        raise BTFError(f"no kernel function installs received fds as ({', '.join(RECEIVE_FD_PARAMS)}): "
                       "neither __receive_fd nor receive_fd has those parameters")
    out["URING"] = int(all(btf.func_params(fn) == p for fn, p in KERNEL_URING_FUNCS.items()))
    out["URING_SENDMSG_ZC"] = 0
    if out["URING"]:
        out.update({name: btf.offsetof(s, m) for name, (s, m) in KERNEL_URING_OFFSETS.items()})
        bit = btf.bit_offsetof("io_ring_ctx", "compat")
        out["OFF_IO_RING_CTX_COMPAT_BYTE"], out["OFF_IO_RING_CTX_COMPAT_BIT"] = bit // 8, bit % 8
        hooks += list(KERNEL_URING_FUNCS)
        if btf.func_params(KERNEL_URING_ZC) == KERNEL_URING_FUNCS["io_sendmsg"]:
            out["URING_SENDMSG_ZC"] = 1
            hooks.append(KERNEL_URING_ZC)
    return out, hooks


def vfs_lock_defines(kallsyms: str = KALLSYMS) -> dict:
    """SAME_FORM=1 with the seqlocks' addresses (hex C literals) where /proc/kallsyms
    names both (as root, with real addresses); else SAME_FORM=0: every receive walks."""
    try:
        with open(kallsyms, "rb") as f:
            text = f.read()
    except OSError:
        return {"SAME_FORM": 0}
    out: dict = {"SAME_FORM": 1}
    for define, sym in VFS_LOCKS.items():
        m = re.search(rb"^([0-9a-f]+) [bBdD] " + sym.encode() + rb"$", text, re.M)
        addr = int(m[1], 16) if m else 0
        if not addr:
            return {"SAME_FORM": 0}
        out[define] = f"{addr:#x}ULL"
    return out


@dataclass
class Filters:
    pid: int | None = None
    mntns: tuple[int, ...] = ()


RUN_ID_MASK = 0x7FFF
RUN_COUNT_MASK = 0x3FFF  # the count; the run id's top bit marks a run that took over (collector/handover.py)
RUN_COUNTER = "/run/fdpass/probe-loads"  # /run is per boot: numbering restarts with the kernel


def next_run_id(path: str = RUN_COUNTER) -> int:
    """Number this probe load within the boot: 15 bits, the top of every seq
    below the sign bit (Avro's long is signed: seq must stay under 2**63).

    Kept in a file under /run, which every boot empties; if it cannot be
    kept, a random number still tells two loads apart with high odds."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 32).strip()
            n = (int(raw) + 1 if raw.isdigit() else 1) & RUN_COUNT_MASK
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(n).encode())
            return n
        finally:
            os.close(fd)
    except OSError:
        return int.from_bytes(os.urandom(2), "little") & RUN_COUNT_MASK


def bpf_source_dir() -> str:
    return str(resources.files("fdpass.bpf"))


COMMON_HEADER = "fdpass_common.h"


def bpf_text(source: str) -> str:
    """A backend's BPF C with bpf/fdpass_common.h pasted in where it is included.

    bcc rewrites map calls (stats.lookup(...), events.ringbuf_output(...)) only
    in the source it is given, not in headers it includes; the shared code uses
    maps, so it must be part of that source."""
    src_dir = bpf_source_dir()
    with open(os.path.join(src_dir, source)) as f:
        text = f.read()
    with open(os.path.join(src_dir, COMMON_HEADER)) as f:
        common = f.read()
    include = f'#include "{COMMON_HEADER}"\n'
    if include not in text:
        raise UserError(f"{source} does not include {COMMON_HEADER}")
    return text.replace(include, common, 1)


def _check_privileges() -> None:
    if os.geteuid() != 0:
        raise UserError("loading eBPF probes needs root (CAP_BPF and CAP_PERFMON): run with sudo")


def _import_bcc():
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc, linked into the venv by scripts/setup)
    except ImportError:
        raise UserError("bcc's Python bindings are missing: run scripts/setup (installs python3-bpfcc)") from None
    return bcc


def _release_compile_heap() -> None:
    """clang and LLVM free most of what a compile allocated, but glibc keeps those pages (~15 MB) until
    asked: give them back once the program is loaded (docs/architecture.md, "Memory")."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to ask
        pass


class Probes:
    """The compiled, attached probes of one backend and their ring buffer.

    backend: "kernel" or "tracepoint" (what open_probes() chose); hooks: what
    is attached, for the "probes attached" line."""

    def __init__(self, filters: Filters | None = None, ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
                 tuning: dict[str, int] | None = None, backend: str = "tracepoint", run_flags: int = 0):
        """tuning: -D values overriding the BPF C's defaults (PENDING_SLOTS,
        WALK_STEPS, PATH_DEPTH, WAKE_EVERY), for tests and benchmarks.
        run_flags: or-ed into the run id (collector/handover.py's HANDOVER_RUN_BIT)."""
        _check_privileges()
        bcc = _import_bcc()
        self.filters = filters or Filters()
        self.backend = backend
        btf = BTF.load()
        if backend == "kernel":
            defines, self.hooks = kernel_plan(btf)
            defines.update(vfs_lock_defines())
            self.coverage = Coverage()
            source = "fdpass_kernel.bpf.c"
        else:
            defines, self.coverage = kernel_defines(btf)
            self.hooks = list(TRACEPOINTS)
            source = "fdpass.bpf.c"
        defines["RINGBUF_PAGES"] = ringbuf_pages
        self.run_id = next_run_id() | run_flags
        defines["RUN_ID"] = self.run_id
        defines.update(tuning or {})
        if self.filters.pid is not None:
            defines["FILTER_PID"] = self.filters.pid
        if self.filters.mntns:
            defines["FILTER_MNTNS"] = 1
        self.defines = defines
        src_dir = bpf_source_dir()
        cflags = [f"-I{src_dir}", "-Wno-macro-redefined"] + [f"-D{k}={v}" for k, v in defines.items()]
        started = time.monotonic()
        try:
            self.bpf = bcc.BPF(text=bpf_text(source).encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception for compile, load and attach errors
            raise UserError(f"could not compile, load or attach the {backend} backend's BPF program: {e} "
                            "(see `fdpass doctor`)") from None
        if backend == "tracepoint":
            try:
                # The per-fd walk is tail-called, and a tail call stays within one
                # program type: one copy for the tracepoints, one for raw_syscalls.
                walk = self.bpf.load_func(b"walk", bcc.BPF.TRACEPOINT)
                self.bpf[b"progs"][ctypes.c_int(0)] = ctypes.c_int(walk.fd)
                if defines["COMPAT"]:
                    walk_raw = self.bpf.load_func(b"walk_raw", bcc.BPF.RAW_TRACEPOINT)
                    self.bpf[b"progs_raw"][ctypes.c_int(0)] = ctypes.c_int(walk_raw.fd)
            except Exception as e:
                raise UserError(f"the kernel refused the BPF walk program: {e}") from None
        if self.filters.mntns:
            table = self.bpf[b"mntns_filter"]
            for ns in self.filters.mntns:
                table[ctypes.c_uint32(ns)] = ctypes.c_uint8(1)
        self.load_seconds = time.monotonic() - started
        _release_compile_heap()
        self.why = ""
        self.ringbuf_pages = ringbuf_pages
        self._rb_open = False
        self._ring = None
        self.reader = None

    def open(self, prefer_c: bool = True) -> None:
        """Start reading the ring buffer: mmapped by the C reader
        (collector/capture.c) when it is built, else through bcc's callback."""
        events = self.bpf[b"events"]
        if prefer_c and _capture is not None:
            self._ring = _capture.RingBuffer(events.map_fd, self.ringbuf_pages * mmap.PAGESIZE)
            self.reader = "c"
        else:
            pending = self._pending = []
            string_at = ctypes.string_at

            def _cb(_ctx, data, size):
                pending.append(string_at(data, size))

            self._cb = _cb  # keep a reference: bcc holds only a C pointer
            events.open_ring_buffer(_cb)
            self.reader = "python"
        self._rb_open = True

    def read(self, timeout_ms: int = 50, max_records: int = READ_BATCH) -> list[bytes]:
        """The committed records (copies), oldest first, at most max_records;
        if there are none, wait up to timeout_ms for some first.

        Records are written without per-record wakeups (they would cost ~5 us
        each; the kernel wakes the reader every WAKE_EVERY records), so a wait
        can sleep on a non-empty buffer: a timeout still reads."""
        if self._ring is not None:
            batch = self._ring.read(max_records)
            if not batch and timeout_ms:
                self._ring.wait(timeout_ms)
                batch = self._ring.read(max_records)
            return batch
        # bcc's consumer has no record limit: it hands over all it finds.
        if not self._pending and timeout_ms:
            self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        batch, self._pending[:] = self._pending[:], []
        return batch

    def discard(self) -> int:
        """Release every committed record unread (the benchmark's kernel-only floor; C reader only)."""
        return self._ring.discard()

    def stats(self) -> dict[str, int]:
        table = self.bpf[b"stats"]
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        return out

    def close(self) -> None:
        self._ring = None  # unmaps the ring buffer before its map goes
        self.bpf.cleanup()


def open_probes(filters: Filters | None = None, ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
                tuning: dict[str, int] | None = None, backend: str = "auto", run_flags: int = 0) -> Probes:
    """The probes of the backend asked for. "auto": the kernel backend when
    this kernel has its functions and lets it attach, else the tracepoint one;
    Probes.why says why that one."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "tracepoint":
        p = Probes(filters, ringbuf_pages, tuning, "tracepoint", run_flags)
        p.why = "chosen with --backend tracepoint"
        return p
    _check_privileges()
    reason = kernel_unavailable_reason()
    if reason is None:
        try:
            p = Probes(filters, ringbuf_pages, tuning, "kernel", run_flags)
            p.why = "in-kernel hooks (fentry/fexit) load here" + (" (auto)" if backend == "auto" else "")
            return p
        except UserError as e:
            reason = str(e)
    if backend == "kernel":
        raise UserError(f"--backend kernel: {reason}")
    p = Probes(filters, ringbuf_pages, tuning, "tracepoint", run_flags)
    p.why = f"in-kernel backend unavailable: {reason}"
    return p


FENTRY_PROBE = b"KFUNC_PROBE(fget_raw, unsigned int fd) { return 0; }"


def kernel_unavailable_reason() -> str | None:
    """Why the kernel backend cannot run here, or None. Checked before the full
    compile: a missing function from BTF, then a one-line fentry program (a
    kernel may refuse fentry outright, e.g. under a locking-down LSM)."""
    try:
        kernel_plan(BTF.load())
    except BTFError as e:
        return str(e)
    bcc = _import_bcc()
    # libbpf prints the refusal on stderr itself; the reason returned says it once.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                b = bcc.BPF(text=FENTRY_PROBE)
            except Exception:
                return "this kernel refuses fentry programs (loading one on fget_raw failed with EPERM or similar)"
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    b.cleanup()
    return None
