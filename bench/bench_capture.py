"""Capture throughput end to end, per output, side by side in one run.

A C workload (bench/capture_workload.c) passes one fd per message over a
unix socketpair at a fixed rate (sendmsg + recvmsg + close: 2 events per
transfer); the collector, a separate process filtered to the workload's pid
(--pid, in the kernel), takes every event to one output:

  floor  probes attached, records released unread by the C reader (kernel-only floor)
  jsonl  `fdpass collect --jsonl` into a pipe the bench reads (lines counted)
  kafka  `fdpass collect --kafka` to a broker of scripts/kafka-local on this machine
  run    `fdpass run` into a chDB store in a temp dir

For each output the rates are tried in increasing order until one loses an
event; a rate passes when the output holds exactly 2 x transfers events
(floor: counted by the collector; jsonl: complete lines read from its
stdout; kafka: the topic's offsets; run:
rows stored) with 0 kernel ring buffer drops, and the workload really ran
at >= 95% of the rate ("slow": no event lost, but the machine could not
run the workload that fast). Per row: the collector's CPU per event (CPU time
after "probes attached", so not clang's compile), its peak RSS (VmRSS, sampled after attach) and
peak anonymous memory (RssAnon: without the mmapped ring buffer), then the
latency at --latency-rate transfers/s: syscall exit (the event's time_ns) to
rows returned by the store's INSERT (run) or to the broker's append (kafka,
a topic with LogAppendTime), p50 / p99 over every event. A burst
(--burst transfers, unpaced, as fast as the workload goes) checks what
the ring buffer absorbs, against the floor's burst: the fastest this machine
makes those events with the probes attached.

  sudo .venv/bin/python bench/bench_capture.py
  sudo .venv/bin/python bench/bench_capture.py --outputs run,kafka --rates 50000,75000 --seconds 10

Recorded 2026-12-03 19:10 UTC on the project's 2-core VM with nothing else
running, --bootstrap to a scripts/kafka-local broker, 10 s per rate, default
64 MiB ring buffer; transfers/s (x2 events):
  output  highest zero-loss rate   us/event  RSS/anon MB    p50/p99 at 2.5k/s
  floor   100,000 (highest tried)      0.08   267/53
  jsonl   100,000 (highest tried)      1.6    303/83
  kafka   100,000 (highest tried)      2.1    300/75         45 ms / 66 ms
  run     100,000 (highest tried)      4.8    669/251        572 ms / 1067 ms
  burst   1M events into run in 3.0 s, 0 lost, 262 MB anon (floor alone:
          256k transfers/s)
Earlier (07:57, 16 MiB ring, another session's qemu on the cores) jsonl held
only 50k: the workload could not go faster on the busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # noqa: allow running from a checkout without install
sys.path.insert(0, str(ROOT / "bench"))

FDPASS = [sys.executable, "-m", "fdpass.cli"]
HERE = [sys.executable, str(Path(__file__).resolve())]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- children: the floor, and `fdpass run` with its inserts timed --------------
def floor_child(pid: int, pages: int) -> None:
    """Probes attached, every record released unread: what the kernel side alone costs."""
    from fdpass.collector.probes import Filters, Probes

    p = Probes(Filters(pid=pid), ringbuf_pages=pages)
    p.open()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("floor: probes attached", file=sys.stderr, flush=True)
    n = 0
    while not stop.is_set():
        p._ring.wait(50)
        n += p.discard()
    n += p.discard()
    k = p.stats()
    print(f"floor: stopped; events={n}, kernel_ringbuf_drops={k['ringbuf_drops']}", file=sys.stderr, flush=True)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    z = shift = 0
    while True:
        b = data[i]
        z |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return (z >> 1) ^ -(z & 1), i
        shift += 7


def time_ns_of(message: bytes) -> int:
    """time_ns of an Avro event message (header, event_id, time_ns: the
    contract's first two fields), without decoding the other 40."""
    n, i = _varint(message, 10)
    return _varint(message, i + n)[0]


def run_child(argv: list[str], latency: bool) -> int:
    """`fdpass run ARGV`; with latency, each insert's rows are timed from their syscalls."""
    from fdpass.cli import main
    from fdpass.sinks import writer

    lat: list[int] = []
    if latency:
        insert = writer.Writer.insert

        def timed(self, batch):
            out = insert(self, batch)
            now = time.time_ns()
            lat.extend(now - time_ns_of(v) for v in batch.values)
            return out

        writer.Writer.insert = timed
    try:
        return main(["run"] + argv)
    finally:
        if lat:
            print("latency_ns " + json.dumps(lat), file=sys.stderr, flush=True)


# --- the parent ----------------------------------------------------------------
def build_workload(tmp: str) -> str:
    binary = os.path.join(tmp, "capture_workload")
    subprocess.run(["cc", "-O2", "-o", binary, str(ROOT / "bench/capture_workload.c")], check=True)
    return binary


class Sampler(threading.Thread):
    """Peak VmRSS / RssAnon of a process (from when it is sampled: after the
    probes compiled), from /proc every 20 ms (the kernel keeps a peak of
    VmRSS only, and that counts the ring buffer's pages)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.hwm, self.anon = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for key, attr in (("VmRSS", "hwm"), ("RssAnon", "anon")):
                m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
                if m:
                    setattr(self, attr, max(getattr(self, attr), int(m.group(1)) * 1024))
            self.done.wait(0.02)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def percentiles(values: list[int]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    v = sorted(values)
    return v[len(v) // 2] / 1e6, v[min(len(v) - 1, int(len(v) * 0.99))] / 1e6


def topic_messages(bootstrap: str, topic: str, want_latency: bool) -> tuple[int, list[int]]:
    """Messages in the topic (its offsets), and with want_latency every message's
    append time minus its event's time_ns."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        total = sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
        lat: list[int] = []
        if want_latency:
            c.subscribe([topic])
            while len(lat) < total:
                m = c.poll(2.0)
                if m is None:
                    break
                lat.append(m.timestamp()[1] * 1_000_000 - time_ns_of(m.value()))
        return total, lat
    finally:
        c.close()


class LineCounter(threading.Thread):
    """Counts the complete lines `collect --jsonl` really wrote (what a consumer of the
    pipe gets), not what the collector says it wrote."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, 0
        self.start()

    def run(self) -> None:
        while chunk := self.pipe.read1(1 << 20):
            self.lines += chunk.count(b"\n")

    def total(self) -> int:
        self.join()
        return self.lines


def trial(output: str, rate: int, transfers: int, workload: str, opts, latency: bool = False) -> dict:
    wl = subprocess.Popen([workload, str(rate), str(transfers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(wl.stdout.readline().split()[1])
    pages = ["--ringbuf-pages", str(opts.ringbuf_pages)]
    tmp = tempfile.mkdtemp(prefix="bench-capture-")
    topic = None
    if output == "floor":
        cmd = HERE + ["--floor-child", str(pid), str(opts.ringbuf_pages)]
    elif output == "jsonl":
        cmd = FDPASS + ["collect", "--jsonl", "--pid", str(pid)] + pages
    elif output == "kafka":
        from confluent_kafka.admin import AdminClient, NewTopic

        topic = f"bench-capture-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": opts.bootstrap})  # kept alive until the topic exists
        admin.create_topics([NewTopic(topic, 6, 1, config={"message.timestamp.type": "LogAppendTime"})])[topic].result(30)
        cmd = FDPASS + ["collect", "--kafka", opts.bootstrap, "--topic", topic, "--spool-dir", f"{tmp}/spool",
                        "--pid", str(pid)] + pages
    else:
        cmd = HERE + ["--run-child", "1" if latency else "0", "--store", f"{tmp}/store", "--pid", str(pid),
                      "--no-status"] + pages
    col = subprocess.Popen(cmd, stdout=subprocess.PIPE if output == "jsonl" else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    lines = LineCounter(col.stdout.buffer) if output == "jsonl" else None
    for line in col.stderr:
        if "probes attached" in line:
            break
    else:
        sys.exit(f"{output}: the collector did not start (exit {col.wait()})")
    cpu0 = cpu_seconds(col.pid)
    sampler = Sampler(col.pid)
    sampler.start()
    wl.stdin.write("go\n")
    wl.stdin.flush()
    done = wl.stdout.readline().split()
    wl.wait()
    seconds = float(done[2])
    time.sleep(1.0)  # the timer drain and the last batch
    cpu1 = cpu_seconds(col.pid)
    col.send_signal(signal.SIGINT)
    err = col.stderr.read()  # the final drain, flush and inserts happen before exit
    col.wait()
    cpu = cpu1 - cpu0
    sampler.done.set()
    sampler.join()
    m = re.search(r"stopped; (.*)", err)
    if not m:
        sys.exit(f"{output}: no summary from the collector:\n{err}")
    stats = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    events = int(stats.get("events", 0)) or int(stats["events_send"]) + int(stats["events_recv"])
    lat: list[int] = []
    if output == "kafka":
        held, lat = topic_messages(opts.bootstrap, topic, latency)
    elif output == "run":
        held = int(stats["stored"])
        lm = re.search(r"latency_ns (.*)", err)
        lat = json.loads(lm.group(1)) if lm else []
    elif lines is not None:
        held = lines.total()
    else:
        held = events
    subprocess.run(["rm", "-rf", tmp])
    drops = int(stats["kernel_ringbuf_drops"])
    return {"output": output, "rate": rate, "achieved": transfers / seconds, "seconds": seconds,
            "want": 2 * transfers, "held": held, "drops": drops,
            "ok": held == 2 * transfers and drops == 0 and (not rate or transfers / seconds >= 0.95 * rate),
            "status": "LOSS" if held != 2 * transfers or drops else
            "yes" if not rate or transfers / seconds >= 0.95 * rate else "slow",
            "cpu_us": cpu / max(events, 1) * 1e6, "cpu_share": cpu / seconds, "hwm": sampler.hwm, "anon": sampler.anon,
            "lat": percentiles(lat) if latency else None}


def show(r: dict) -> str:
    lat = f"{r['lat'][0]:8.0f} {r['lat'][1]:8.0f}" if r.get("lat") else f"{'':8} {'':8}"
    return (f"{r['output']:<6} {r['rate']:>8,} {r['achieved']:>9,.0f} {r['held']:>10,}/{r['want']:<10,} {r['drops']:>8,}"
            f" {r['status']:>4} {r['cpu_us']:>7.2f} {r['cpu_share']:>6.2f} {r['hwm'] / 2**20:>7.0f}"
            f" {r['anon'] / 2**20:>7.0f} {lat}")


HEADER = (f"{'output':<6} {'rate':>8} {'achieved':>9} {'events held/wanted':>21} {'drops':>8} {'ok':>4} {'us/ev':>7}"
          f" {'cores':>6} {'RSS MB':>7} {'anon MB':>7} {'p50 ms':>8} {'p99 ms':>8}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-child":
        return floor_child(int(sys.argv[2]), int(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "--run-child":
        sys.exit(run_child(sys.argv[3:], sys.argv[2] == "1"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", default="floor,jsonl,kafka,run")
    ap.add_argument("--rates", default="25000,50000,75000,100000", help="transfers/s to try, increasing")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--latency-rate", type=int, default=2500, help="transfers/s of the latency trial (0: none)")
    ap.add_argument("--burst", type=int, default=500_000,
                    help="transfers of the unpaced burst into the floor and `run` (0: none)")
    ap.add_argument("--ringbuf-pages", type=int, default=None, help="default: fdpass's")
    ap.add_argument("--bootstrap", help="a running broker (default: start one with scripts/kafka-local)")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_capture.py loads the probes: run it as root")
    from fdpass.collector.probes import DEFAULT_RINGBUF_PAGES

    opts.ringbuf_pages = opts.ringbuf_pages or DEFAULT_RINGBUF_PAGES
    outputs = opts.outputs.split(",")
    rates = [int(r) for r in opts.rates.split(",")]
    broker = None
    if "kafka" in outputs and not opts.bootstrap:
        from bench_publish import OwnBroker

        broker = OwnBroker()
        opts.bootstrap = broker.bootstrap
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workload = build_workload(tmp)
            for output in outputs:
                for rate in rates:
                    r = trial(output, rate, int(rate * opts.seconds), workload, opts)
                    print(show(r), flush=True)
                    results.append(r)
                    if not r["ok"]:
                        break
                if opts.latency_rate and output in ("kafka", "run"):
                    r = trial(output, opts.latency_rate, int(opts.latency_rate * opts.seconds), workload, opts,
                              latency=True)
                    print(show(r), flush=True)
                    results.append(r)
            for output in outputs if opts.burst else ():
                if output in ("floor", "run"):
                    r = trial(output, 0, opts.burst, workload, opts)
                    print(show(r) + "  (burst)", flush=True)
                    results.append(r)
    finally:
        if broker:
            broker.stop()
    print(f"\n{os.cpu_count()} CPUs, {opts.seconds:.0f} s per rate, ring buffer {opts.ringbuf_pages} pages"
          f" ({opts.ringbuf_pages * 4096 // 2**20} MiB); rate and achieved in transfers/s (2 events each)")
    print(HEADER)
    for r in results:
        print(show(r) + ("  (burst)" if r["rate"] == 0 else ""))
    for output in outputs:
        ok = [r["rate"] for r in results if r["output"] == output and r["ok"] and r["rate"]]
        print(f"{output}: highest rate with zero loss {max(ok) if ok else 0:,} transfers/s"
              f" ({2 * max(ok) if ok else 0:,} events/s)")


if __name__ == "__main__":
    main()
