"""`fdpass doctor`: what this machine offers the probes, each with a verdict and a fix."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Callable, TextIO

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


@dataclass
class Check:
    name: str
    verdict: str  # OK, WARN, FAIL
    detail: str
    fix: str = ""


def _tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def check_privileges() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", "OK", "running as root")
    return Check("privileges", "FAIL", f"running as uid {os.geteuid()}", "run as root (sudo fdpass ...)")


def check_btf() -> Check:
    from fdpass.collector.btf import BTF, BTFError
    from fdpass.collector.probes import kernel_defines

    try:
        btf = BTF.load()
        n = len(kernel_defines(btf)[0])
    except BTFError as e:
        return Check("BTF", "FAIL", str(e), "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    return Check("BTF", "OK", f"/sys/kernel/btf/vmlinux: all {n} struct offsets fdpass needs found")


def check_tracepoints() -> Check:
    from fdpass.collector.probes import TRACEPOINTS

    d = _tracefs()
    if d is None:
        return Check("tracepoints", "FAIL", "tracefs is not mounted",
                     "mount -t tracefs none /sys/kernel/tracing (scripts/setup does this)")
    missing = [tp for tp in TRACEPOINTS if not os.path.isdir(os.path.join(d, "events", *tp.split(":")))]
    if missing:
        return Check("tracepoints", "FAIL", "missing: " + ", ".join(missing), "a kernel with CONFIG_FTRACE_SYSCALLS=y")
    return Check("tracepoints", "OK", f"{len(TRACEPOINTS)} syscall tracepoints present ({d})")


def coverage_checks() -> list[Check]:
    """Each way an fd can move over a unix socket: seen on this kernel or not, and why.
    The README's "What it sees" section says the same; docs/kernel.md says how."""
    from fdpass.collector.btf import BTF, BTFError
    from fdpass.collector.probes import kernel_defines

    try:
        _defines, cov = kernel_defines(BTF.load())
    except BTFError as e:
        return [Check("coverage", "FAIL", f"cannot tell: {e}")]
    d = _tracefs() or TRACEFS_DIRS[0]
    raw = os.path.isdir(os.path.join(d, "events", "raw_syscalls", "sys_enter"))
    out = [Check("seen: native", "OK", "64-bit sendmsg, sendmmsg, recvmsg, recvmmsg (syscalls:sys_{enter,exit}_*)")]
    if cov.compat is None and raw:
        out.append(Check("seen: compat", "OK", "32-bit programs and int $0x80: sendmsg, sendmmsg, recvmsg, "
                         "recvmmsg(_time64), socketcall (raw_syscalls:sys_enter/sys_exit)"))
    else:
        out.append(Check("not seen: compat", "WARN", cov.compat or "raw_syscalls tracepoints missing",
                         "32-bit programs' transfers are not recorded on this kernel"))
    if cov.io_uring is None:
        zc = "" if cov.io_uring_zc is None else f" (SENDMSG_ZC: {cov.io_uring_zc})"
        out.append(Check("seen: io_uring", "OK", "IORING_OP_SENDMSG, SENDMSG_ZC and RECVMSG, inline and in io-wq "
                         f"workers (io_uring:io_uring_submit_req or _sqe, io_uring_complete){zc}"))
    else:
        out.append(Check("not seen: io_uring", "WARN", cov.io_uring, "io_uring transfers are not recorded"))
    out.append(Check("not seen: io_uring", "WARN", "IORING_OP_MSG_RING with IORING_MSG_SEND_FD (moves a file "
                     "between rings, no SCM_RIGHTS) and multishot RECVMSG (fds land in provided buffers)",
                     "out of scope for now: docs/kernel.md, \"What is not seen\""))
    if os.path.exists(os.path.join(d, "kprobe_events")):
        out.append(Check("not seen: in-kernel", "WARN", "this kernel has kprobes, but fdpass does not hook the "
                         "kernel's SCM_RIGHTS functions yet: only the paths above are seen"))
    else:
        out.append(Check("in-kernel hooks", "OK", "none on this kernel (no kprobes, fentry refused): the "
                         "tracepoints above are the capture paths"))
    return out


def check_kprobes() -> Check:
    d = _tracefs()
    if d and os.path.exists(os.path.join(d, "kprobe_events")):
        return Check("kprobes", "OK", "available (optional; fdpass uses tracepoints)")
    return Check("kprobes", "WARN", "not available (CONFIG_KPROBES off)",
                 "none needed: fdpass captures from tracepoints (syscalls, raw_syscalls, io_uring)")


def check_fentry() -> Check:
    lockdown = ""
    try:
        with open("/sys/kernel/security/lockdown") as f:
            lockdown = f.read().strip()
    except OSError:
        pass
    detail = "not used by fdpass"
    if "[integrity]" in lockdown or "[confidentiality]" in lockdown:
        detail += f"; kernel lockdown is {lockdown.split('[')[1].split(']')[0]} (fentry/LSM programs are likely refused)"
    return Check("fentry", "OK", detail)


def check_bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return Check("bcc", "FAIL", "bcc's Python bindings are not importable", "scripts/setup (apt: python3-bpfcc)")
    return Check("bcc", "OK", f"bcc at {os.path.dirname(bcc.__file__)}")


def check_headers() -> Check:
    custom = os.environ.get("BCC_KERNEL_SOURCE")  # bcc's own override (the container image sets it)
    if custom:
        if os.path.isdir(os.path.join(custom, "include")):
            return Check("kernel headers", "OK", f"BCC_KERNEL_SOURCE={custom} (only for bcc's compiler; layouts come from BTF)")
        return Check("kernel headers", "FAIL", f"BCC_KERNEL_SOURCE={custom} has no include/ directory",
                     "point BCC_KERNEL_SOURCE at a kernel headers tree, or unset it")
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.exists(os.path.join(build, "include")):
        return Check("kernel headers", "FAIL", f"{build} is missing; bcc refuses to compile without a headers tree",
                     "scripts/setup links the distro's generic headers (layouts come from BTF, so any version works)")
    target = os.path.realpath(build)
    return Check("kernel headers", "OK", f"{build} -> {target} (only for bcc's compiler; layouts come from BTF)")


def check_compile() -> Check:
    """The real thing: compile, load and attach the probes, then detach."""
    from fdpass.collector.probes import Probes
    from fdpass.errors import UserError

    try:
        p = Probes()
    except UserError as e:
        return Check("probes", "FAIL", str(e), "fix the FAIL lines above first")
    secs = p.load_seconds
    p.close()
    return Check("probes", "OK", f"compiled, loaded and attached in {secs:.1f} s")


# The C parts (setup.py): optional, same results, several times faster.
ACCELERATORS = (
    ("fdpass.collector._capture", "batched ring buffer reader and record -> Avro encoder (capture)"),
    ("fdpass.schemas._avro_writer", "Avro writer (collector publish)"),
    ("fdpass.sinks._avro_to_native", "Avro -> ClickHouse Native (sink inserts)"),
)


def check_accelerators() -> Check:
    import importlib

    missing = []
    for module, what in ACCELERATORS:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(what)
    if missing:
        return Check("C accelerators", "WARN", "not built: " + "; ".join(missing) + " (pure-Python paths in use, slower)",
                     "install a C compiler and Python's headers (gcc, python3-dev), then scripts/setup "
                     "or pip install fdpass again")
    return Check("C accelerators", "OK", "built: " + "; ".join(what for _, what in ACCELERATORS))


CHECKS: tuple[Callable[[], Check], ...] = (
    check_privileges, check_btf, check_tracepoints, check_kprobes, check_fentry, check_bcc, check_headers,
    check_accelerators,
)


def run_checks(out: TextIO) -> int:
    results = [c() for c in CHECKS]
    if all(r.verdict != "FAIL" for r in results):
        results += coverage_checks()
    if all(r.verdict != "FAIL" for r in results):
        results.append(check_compile())
    width = max(len(r.name) for r in results)
    for r in results:
        out.write(f"{r.verdict:<4}  {r.name:<{width}}  {r.detail}\n")
        if r.fix and r.verdict != "OK":
            out.write(f"{'':<4}  {'':<{width}}  fix: {r.fix}\n")
    failed = [r.name for r in results if r.verdict == "FAIL"]
    out.write("fdpass can run here.\n" if not failed else f"fdpass cannot run here: {', '.join(failed)}.\n")
    return 1 if failed else 0
