"""`fdpass collect` and `fdpass doctor`."""

from __future__ import annotations

import argparse
import os
import select
import sys

from fdpass.collector.probes import BACKENDS, DEFAULT_RINGBUF_PAGES, RECORD_BYTES
from fdpass import logs
from fdpass.errors import UserError

COLLECT_HELP = """\
Trace every file descriptor passed over a unix socket (SCM_RIGHTS), on the
send and on the receive side, with eBPF. Needs root.

Two capture backends (--backend; `fdpass doctor` says which one runs here):
  kernel      fentry/fexit on the kernel functions that move the files
              (__scm_send, scm_detach_fds, ...): exact fd and file on both
              sides, every entry point (64-bit, 32-bit, io_uring) at once.
              Needs a kernel that allows fentry (e.g. Debian's, Ubuntu's).
  tracepoint  syscall, raw_syscalls and io_uring tracepoints: runs wherever
              BTF and tracepoints exist; file_verified says which events rest
              on the kernel's own SCM_RIGHTS list.
  auto        (default) kernel when its hooks load here, else tracepoint.

One event per passed descriptor; field names are the data contract (README,
"The event"). Once every probe is attached, a line containing
"probes attached" goes to stderr. A summary (events, kernel drops) goes to
stderr at exit.

examples:
  fdpass collect --jsonl                      everything, JSON lines on stdout
  fdpass collect --jsonl --duration 10        stop after 10 s
  fdpass collect --jsonl --pid 1234           only process 1234
  fdpass collect --jsonl --container 3f2a9c   only that container's mount namespaces
  fdpass collect --kafka 127.0.0.1:9092       publish Avro events to Kafka
  fdpass collect --jsonl --backend tracepoint the tracepoint backend even where fentry works
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return v


def seconds_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return v


def _mntns_list(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        try:
            out.append(_positive_int(part.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected mount namespace inode numbers, e.g. 4026531841 (see `ls -l /proc/PID/ns/mnt`)"
            ) from None
    return tuple(out)


def add_backend_argument(p) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="capture backend: kernel (in-kernel fentry hooks, exact), tracepoint (syscall "
                   "tracepoints, runs everywhere), or auto (default: kernel when it loads here, else "
                   "tracepoint; `fdpass doctor` says which and why)")


def add_filter_arguments(p) -> None:
    filt = p.add_argument_group("filters (applied in the kernel)")
    filt.add_argument("--pid", type=_positive_int, help="only this process (thread group id)")
    filt.add_argument("--mntns", type=_mntns_list, metavar="INODE[,INODE...]",
                      help="only tasks in these mount namespaces")
    filt.add_argument("--container", metavar="ID", help="only tasks in this container (id or its prefix)")


def register(sub) -> None:
    p = sub.add_parser("collect", help="trace passed fds on this host (root)", description=COLLECT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    out = p.add_argument_group("output (choose one)")
    out.add_argument("--jsonl", action="store_true", help="write one JSON object per event on stdout")
    add_filter_arguments(p)
    add_backend_argument(p)
    p.add_argument("--duration", type=seconds_arg, metavar="SECONDS", help="stop after this long (default: until SIGINT/SIGTERM)")
    add_ringbuf_argument(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here (e.g. 0.0.0.0:9464)")
    logs.add_arguments(p)
    try:
        from fdpass.collector import publisher
    except ImportError:
        publisher = None
    if publisher is not None:
        publisher.add_arguments(out)  # --kafka HOST:PORT, --topic, --kafka-config, spool options
    else:
        out.add_argument("--kafka", metavar="HOST:PORT", help="publish Avro events to Kafka (not built yet)")
    from fdpass.collector import handover as handovers

    handovers.add_arguments(p)  # --after-handover, --ready-file
    p.set_defaults(func=run_collect)

    d = sub.add_parser("doctor", help="check this kernel and machine for what fdpass needs",
                       description="Check BTF, tracepoints, kprobes, fentry, bcc, kernel headers and "
                       "privileges; say which capture backend `collect` and `run` will use here and why "
                       "(--backend auto); print a verdict and the fix for each. Exit 1 if fdpass cannot run.")
    d.set_defaults(func=run_doctor)


def add_ringbuf_argument(p) -> None:
    p.add_argument("--ringbuf-pages", type=_positive_int, default=DEFAULT_RINGBUF_PAGES, metavar="N",
                   help=f"kernel ring buffer size in 4 KiB pages, a power of two (default {DEFAULT_RINGBUF_PAGES} = "
                   f"{DEFAULT_RINGBUF_PAGES * 4 // 1024} MiB of locked kernel memory, ~{DEFAULT_RINGBUF_PAGES * 4096 // RECORD_BYTES // 1000}k records: "
                   "what a burst may get ahead of the reader without loss)")


def check_ringbuf_pages(pages: int) -> None:
    if pages & (pages - 1):
        raise UserError(f"--ringbuf-pages {pages}: must be a power of two")


def filters_from_args(args):
    from fdpass.collector.collect import mntns_of_container
    from fdpass.collector.probes import Filters

    if args.container and args.mntns:
        raise UserError("use --container or --mntns, not both")
    if args.pid is not None and not os.path.exists(f"/proc/{args.pid}"):
        raise UserError(f"--pid {args.pid}: no such process")
    mntns = args.mntns or (mntns_of_container(args.container) if args.container else ())
    return Filters(pid=args.pid, mntns=mntns)


def _jsonl_output():
    """Batches of lines straight to fd 1. Not through sys.stdout.buffer: on a
    pipe whose reader lags, its write of a large batch was seen to keep part
    of it only (a line cut and its rest lost, no error); a partial os.write
    says how much went, and the rest is written after."""
    sys.stdout.flush()
    fd, join, write = sys.stdout.fileno(), b"".join, os.write

    def emit(lines: list[bytes]) -> None:
        data = memoryview(join(lines))
        while data:
            try:
                n = write(fd, data)
            except BlockingIOError:  # stdout inherited non-blocking: wait for the reader
                select.select([], [fd], [])
                continue
            data = data[n:]

    return emit, (lambda: None)


def run_collect(args) -> int:
    logs.setup("collect", args.verbose, args.log_format)
    if args.jsonl == bool(args.kafka):
        raise UserError("choose one output: --jsonl or --kafka HOST:PORT")
    check_ringbuf_pages(args.ringbuf_pages)
    filters = filters_from_args(args)

    from fdpass.collector import handover as handovers
    from fdpass.collector.collect import Collector

    publisher = handover = None
    if args.kafka:
        from fdpass.collector.enrich import HostInfo
        from fdpass.collector.publisher import KafkaPublisher

        # Another collector on this spool: take over from it at a cutover, no gap (collector/handover.py).
        handover = handovers.Handover(args.spool_dir)
        if handover.claim():
            publisher = KafkaPublisher.from_args(args)
        key = HostInfo().host_id.encode()  # what publish(event) keys by: per-host order
        outputs = {"encoded_output": lambda values: publisher.publish_encoded_many(key, values)}
        flush = lambda: None  # noqa: E731
    else:
        emit, flush = _jsonl_output()
        outputs = {"encoded_output": emit, "jsonl": True}

    def attached() -> None:
        p = collector.probes
        print(f"fdpass collect: probes attached ({p.backend} backend: {p.why}; " + ", ".join(p.hooks) + ")",
              file=sys.stderr, flush=True)

    try:
        collector = Collector(filters=filters, ringbuf_pages=args.ringbuf_pages, backend=args.backend,
                              handover=handover, **outputs)
        if publisher is None and handover is not None:  # the predecessor holds the spool until it is done
            handover.take_over()
            publisher = KafkaPublisher.from_args(args)
    except BaseException:
        if publisher is not None:
            publisher.close()  # releases the spool; nothing was published yet
        raise
    if args.metrics:
        from fdpass import metrics

        sources = {"collect": collector.stats}
        if publisher is not None:
            sources["kafka"] = publisher.stats
        metrics.serve(args.metrics, sources)
    collector.stop_on_signals()
    handovers.ready(args)  # before the line: "attached" means ready in every way
    attached()  # after the metrics endpoint is up
    try:
        stats = collector.run(duration=args.duration, tick=flush)
    finally:
        if not collector.output_closed:
            flush()
    if collector.output_closed:
        # stdout's reader left (e.g. `| head`): not an error; keep the exit flush quiet
        sys.stdout = open(os.devnull, "w")
    undelivered = 0
    if publisher is not None:
        undelivered = publisher.close()
        stats.update({f"kafka_{k}": v for k, v in publisher.stats().items()})
    if handover is not None and handover.dropped:
        stats["handover_left_to_the_other"] = handover.dropped
    handovers.handed_over(args, handover, collector._stop.wait)  # after the spool is closed: a successor may take it
    print("fdpass collect: stopped; " + ", ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    if stats["kernel_ringbuf_drops"] or stats["loss_records"] or stats["kernel_pending_full"] or \
            stats["output_errors"] or stats["kernel_recv_unresolved"]:
        print("fdpass collect: WARNING: some transfers were not reported (see counts above); "
              "raise --ringbuf-pages if ringbuf drops are non-zero", file=sys.stderr)
    if stats["kernel_uring_unseen"]:
        print(f"fdpass collect: WARNING: {stats['kernel_uring_unseen']} io_uring sendmsg/recvmsg requests with "
              "control data asked for no completion on success (IOSQE_CQE_SKIP_SUCCESS): the tracepoint backend "
              "cannot see whether they moved fds (docs/kernel.md, 'What is not seen')", file=sys.stderr)
    return 1 if undelivered else 0


def run_doctor(args) -> int:
    from fdpass.collector.doctor import run_checks

    return run_checks(sys.stdout)
