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


def kernel_backend_reason() -> str | None:
    """Why `--backend auto` will not use the in-kernel backend here (None: it will)."""
    from fdpass.collector.probes import kernel_unavailable_reason

    return kernel_unavailable_reason()


def check_backend(reason: str | None) -> Check:
    if reason is None:
        return Check("capture backend", "OK", "kernel: fentry/fexit on the kernel functions that move the files "
                     "load here, so --backend auto uses them (exact fds and files, file_verified always true)")
    return Check("capture backend", "OK", "tracepoint: --backend auto falls back to it, the in-kernel backend "
                 "cannot run here (see fentry above)")


def coverage_checks(kernel_reason: str | None) -> list[Check]:
    """Each way an fd can move over a unix socket: seen on this kernel or not, and why.
    The README's "What it sees" section says the same; docs/kernel.md says how."""
    from fdpass.collector.btf import BTF, BTFError
    from fdpass.collector.probes import kernel_defines, kernel_plan

    if kernel_reason is None:
        _defines, hooks = kernel_plan(BTF.load())
        uring = [h for h in hooks if h.startswith("io_")]
        out = [Check("seen: every entry point", "OK", "native, compat (32-bit programs, int $0x80, x32, "
                     "socketcall) and io_uring transfers all pass the hooked functions: " + ", ".join(
                         h for h in hooks if not h.startswith("io_")))]
        if uring:
            out.append(Check("seen: io_uring", "OK", "IORING_OP_SENDMSG, RECVMSG" + (", SENDMSG_ZC" if len(uring) > 2
                             else "") + " named as such (" + ", ".join(uring) + ")"))
        else:
            out.append(Check("io_uring naming", "WARN", "io_sendmsg/io_recvmsg are not in BTF: io_uring transfers "
                             "are seen but their calls are not named, so they are not reported",
                             "--backend tracepoint reports them from the io_uring tracepoints"))
        out.append(Check("not seen: io_uring", "WARN", "IORING_OP_MSG_RING with IORING_MSG_SEND_FD (moves a file "
                         "between rings, no SCM_RIGHTS); multishot RECVMSG is not checked",
                         "out of scope for now: docs/kernel.md, \"What is not seen\""))
        return out
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
    out.append(Check("not seen: raced", "WARN", "a sendmsg/recvmsg whose msg_controllen another thread changes "
                     "between this backend's entry probe and the kernel's copy is not reported (the other side "
                     "of its transfer is; no event names a wrong file because of it)",
                     "a kernel with fentry (the in-kernel backend reads the kernel's copy); docs/kernel.md, "
                     "\"What is not seen\""))
    return out


def check_kprobes() -> Check:
    d = _tracefs()
    if d and os.path.exists(os.path.join(d, "kprobe_events")):
        return Check("kprobes", "OK", "available (not used: the in-kernel backend hooks with fentry/fexit)")
    return Check("kprobes", "OK", "not available (CONFIG_KPROBES off); not needed: the in-kernel backend hooks "
                 "with fentry/fexit, the tracepoint backend with tracepoints")


def check_fentry(reason: str | None) -> Check:
    if reason is None:
        return Check("fentry", "OK", "fentry/fexit programs load and attach (the in-kernel backend)")
    lockdown = ""
    try:
        with open("/sys/kernel/security/lockdown") as f:
            lockdown = f.read().strip()
    except OSError:
        pass
    detail = f"in-kernel backend unavailable: {reason}"
    if "[integrity]" in lockdown or "[confidentiality]" in lockdown:
        detail += f"; kernel lockdown is {lockdown.split('[')[1].split(']')[0]}"
    return Check("fentry", "WARN", detail, "none needed: the tracepoint backend captures here "
                 "(file_verified says which events it could check against the kernel's list)")


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
    """The real thing: compile, load and attach the probes `--backend auto` picks, then detach."""
    from fdpass.collector.probes import open_probes
    from fdpass.errors import UserError

    try:
        p = open_probes()
    except UserError as e:
        return Check("probes", "FAIL", str(e), "fix the FAIL lines above first")
    secs = p.load_seconds
    p.close()
    return Check("probes", "OK", f"{p.backend} backend compiled, loaded and attached in {secs:.1f} s")


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
    check_privileges, check_btf, check_tracepoints, check_kprobes, check_bcc, check_headers, check_accelerators,
)


def run_checks(out: TextIO) -> int:
    results = [c() for c in CHECKS]
    if all(r.verdict != "FAIL" for r in results):
        reason = kernel_backend_reason()
        results += [check_fentry(reason), check_backend(reason)] + coverage_checks(reason)
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
