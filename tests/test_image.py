"""The images, built and run on this machine's kernel (marker `image`).

scripts/docker-engine starts a Docker engine where none runs, scripts/build-image
builds fdpass:local (collector, no chDB), fdpass:local-embedded and
fdpass-kafka:local; then:

- a rebuild with nothing changed takes every step from the engine's cache;
- the CA bundle given to the build (a BuildKit secret) is in no layer of the images;
- the collector container (the compose file's mounts and the local override's
  capabilities, pid namespace of the host) passes `fdpass doctor` and records a
  transfer made by a process on the host, with its host pid, exe and path; without
  the host's headers mounts it compiles the probes with the image's own tree;
- the compose stack (docker-compose.yml + deploy/docker/compose.local.yml) comes
  up, a transfer made on the host reaches the chDB store through collector ->
  Kafka -> sink, `fdpass query transfers` finds it, and the stack goes down.

CI runs these (the whole suite); `pytest -m "not image"` leaves them out. The
first build on a machine takes a few minutes (debootstrap, apt, PyPI); later
runs reuse the engine's layers.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.image

IMAGES = ("fdpass:local", "fdpass:local-embedded", "fdpass-kafka:local")
COMPOSE_FILES = ("-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "deploy/docker/compose.local.yml"))
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# The collector's container, as the compose file and its local override run it.
COLLECTOR_MOUNTS = ("/sys/kernel/btf", "/sys/kernel/tracing", "/sys/kernel/debug",
                    "/lib/modules", "/usr/src", "/etc/machine-id")


def collector_run(mounts=COLLECTOR_MOUNTS) -> list[str]:
    return ["docker", "run", "--rm", "--pid", "host", "--uts", "host", "--cgroupns", "host",
            "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            *[a for m in mounts for a in ("-v", f"{m}:{m}:ro")]]


COLLECTOR_RUN = collector_run()


def run(cmd, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def images():
    """A running engine and the three images (built, or taken from the cache)."""
    run(["bash", str(ROOT / "scripts/docker-engine"), "start"], timeout=300)
    t0 = time.monotonic()
    r = run(["bash", str(ROOT / "scripts/build-image")], timeout=1800)
    print(f"scripts/build-image: {time.monotonic() - t0:.0f} s\n{r.stdout}{r.stderr}")
    sizes = {}
    for img in IMAGES:
        sizes[img] = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", img]).stdout)
    return sizes


def test_images_built(images):
    # The collector image leaves chDB out; the embedded one has it.
    assert images["fdpass:local-embedded"] > images["fdpass:local"] + 200e6
    probe = "import importlib.util as u; print(u.find_spec('chdb') is not None)"
    assert run(["docker", "run", "--rm", "--entrypoint", "python", "fdpass:local", "-c", probe]).stdout.strip() == "False"
    assert run(["docker", "run", "--rm", "--entrypoint", "python", "fdpass:local-embedded", "-c", probe]).stdout.strip() == "True"
    # No compiler in the image that runs on every node.
    r = run(["docker", "run", "--rm", "--entrypoint", "sh", "fdpass:local", "-c",
             "command -v gcc cc clang || echo none"])
    assert r.stdout.strip() == "none"


def test_rebuild_takes_every_step_from_the_cache(images):
    # scripts/build-image just ran (fixture); a second run with nothing
    # changed must not execute any RUN step again.
    run(["bash", str(ROOT / "scripts/build-image"), "collector", "kafka"], timeout=600)
    for log in ("fdpass-local.log", "fdpass-kafka-local.log"):
        text = (ROOT / "var/build-image" / log).read_text()
        steps = re.findall(r"^#\d+ \[[^\]]*\] (RUN|COPY) .*$", text, re.M)
        assert steps, f"{log}: no build steps found"
        ran = [line for line in text.splitlines() if re.match(r"^#\d+ \d+\.\d+ ", line)]
        assert not ran, f"{log}: steps ran again instead of coming from the cache:\n" + "\n".join(ran[:10])
        assert "CACHED" in text


def _pem_bodies(text: str) -> set[str]:
    return {"".join(b.split()) for b in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)}


def layers_holding(img: str, needles: list[bytes]) -> list[tuple[str, bytes]]:
    """(layer:file, needle) for every needle found in any file of any layer of `img` (docker save)."""
    save = subprocess.Popen(["docker", "save", img], stdout=subprocess.PIPE)
    found = []
    with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
        for member in outer:
            if not member.isfile():
                continue
            data = outer.extractfile(member).read()
            found += [(member.name, n) for n in needles if n in data]
            if member.name.endswith(".tar"):
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as layer:
                    for f in layer:
                        if f.isfile():
                            body = layer.extractfile(f).read()
                            found += [(f"{member.name}:{f.name}", n) for n in needles if n in body]
    assert save.wait(timeout=300) == 0
    return found


def test_ca_bundle_is_in_no_layer(images):
    """The host's CA bundle reached the build as a secret: none of its certificates that
    the image does not have anyway (the gateway's own CA) is in any layer or the history."""
    # The CAs this host adds to the public ones (e.g. /usr/local/share/ca-certificates):
    # the host's bundle less Debian's copy of Mozilla's list, on the host and in the image.
    public = set()
    for f in Path("/usr/share/ca-certificates/mozilla").glob("*.crt"):
        public |= _pem_bodies(f.read_text())
    host = _pem_bodies(HOST_CA_BUNDLE.read_text()) - public
    for img in ("fdpass:local", "fdpass:local-embedded"):
        image_public = run(["docker", "run", "--rm", "--entrypoint", "sh", img, "-c",
                            "cat /usr/share/ca-certificates/mozilla/*.crt"]).stdout
        extra = host - _pem_bodies(image_public)
        # Each certificate's base64 as it sits in a PEM file: 64-character lines.
        needles = [b[i:i + 64].encode() for b in extra for i in (64, 128)]
        # The pip setting lives in the RUN steps alone, not in the image's environment.
        env = run(["docker", "image", "inspect", "--format", "{{json .Config.Env}}", img]).stdout
        assert "PIP_CERT" not in env and "ca_bundle" not in env
        hist = run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", img]).stdout
        assert not [n for n in needles if n.decode() in hist]
        assert run(["docker", "run", "--rm", "--entrypoint", "sh", img, "-c",
                    "test ! -e /run/secrets/ca_bundle && echo absent"]).stdout.strip() == "absent"
        if not needles:
            continue  # no CA beyond the public ones on this host: nothing that could leak
        found = layers_holding(img, needles)
        assert not found, f"{img}: the build's CA bundle leaked into {sorted({f for f, _ in found})}"


class Transfer:
    """A process on the host that sends an fd of `path` over a socketpair to itself
    (SEND then RECV) when `go` is called, and lives on until `finish`: the collector
    reads /proc/PID/exe after the event, which a process that has exited no longer has."""

    SCRIPT = ("import os, socket, sys\n"
              "sys.stdin.readline()\n"
              "a, b = socket.socketpair()\n"
              "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
              "socket.send_fds(a, [b'x'], [fd])\n"
              "socket.recv_fds(b, 1, 4)\n"
              "print('sent', flush=True)\n"
              "sys.stdin.read()\n")

    def __init__(self, path: Path):
        path.write_text("fdpass image test\n")
        self.path = str(path)
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, self.path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.exe = os.path.realpath(sys.executable)

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "sent"

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def test_collector_container_on_the_host_kernel(images, tmp_path):
    r = run([*COLLECTOR_RUN, "fdpass:local", "doctor"], timeout=300, check=False)
    assert r.returncode == 0 and "fdpass can run here." in r.stdout, f"doctor in the container:\n{r.stdout}\n{r.stderr}"

    # A path that exists on the host only: the container's filesystem has no /work or tmp_path.
    xfer = Transfer(tmp_path / f"host-only-{uuid.uuid4().hex[:8]}.txt")
    collector = subprocess.Popen([*COLLECTOR_RUN, "fdpass:local", "collect", "--jsonl", "--pid", str(xfer.pid),
                                  "--duration", "120"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    attached = threading.Event()
    err: list[str] = []

    def read_stderr():
        for line in collector.stderr:
            err.append(line)
            if "probes attached" in line:
                attached.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    events = []
    try:
        assert attached.wait(180), "the collector did not attach its probes:\n" + "".join(err)
        xfer.go()
        deadline = time.monotonic() + 60
        for line in collector.stdout:
            events.append(json.loads(line))
            if {e["direction"] for e in events} >= {"SEND", "RECV"} or time.monotonic() > deadline:
                break
    finally:
        xfer.finish()
        collector.terminate()  # docker run forwards SIGTERM to the collector
        collector.wait(timeout=60)
    by_dir = {e["direction"]: e for e in events}
    assert set(by_dir) == {"SEND", "RECV"}, f"events: {events}\nstderr:\n{''.join(err)}"
    for e in by_dir.values():
        assert e["pid"] == xfer.pid  # the host's pid: the container shares the host's pid namespace
        assert e["file_path"] == xfer.path  # walked up to the sending task's own root, in the kernel
        assert e["exe"] == xfer.exe  # readlink of /proc/PID/exe: the host's path of the executable
        assert e["host"] == socket.gethostname()
        assert e["host_id"] == Path("/etc/machine-id").read_text().strip()
        assert e["file_verified"] is True
    assert by_dir["SEND"]["transfer_id"] == by_dir["RECV"]["transfer_id"]


def test_collector_container_without_host_headers(images):
    # A host with no headers tree (cloud images, Firecracker VMs): /lib/modules and
    # /usr/src not mounted, the image's generic tree compiles the probes.
    without = collector_run([m for m in COLLECTOR_MOUNTS if m not in ("/lib/modules", "/usr/src")])
    r = run([*without, "fdpass:local", "doctor"], timeout=300, check=False)
    assert r.returncode == 0 and "fdpass can run here." in r.stdout, f"{r.stdout}\n{r.stderr}"
    assert "BCC_KERNEL_SOURCE=/opt/fdpass/kernel-headers" in r.stdout


def test_compose_stack(images, tmp_path):
    project = f"fdpass-test-{os.getpid()}"
    # The test's own override on top: no published port (a developer's stack may hold 29092).
    extra = tmp_path / "no-ports.yml"
    extra.write_text("services:\n  kafka:\n    ports: !reset []\n")
    compose = ["docker", "compose", "-p", project, *COMPOSE_FILES, "-f", str(extra)]
    try:
        t0 = time.monotonic()
        run([*compose, "up", "-d", "--no-build", "--wait", "kafka"], timeout=300)
        run([*compose, "up", "-d", "--no-build"], timeout=300)
        deadline = time.monotonic() + 180
        while "probes attached" not in (logs := run([*compose, "logs", "collector"]).stdout):
            assert time.monotonic() < deadline, f"the collector did not start:\n{logs}"
            time.sleep(1)
        print(f"stack up, probes attached: {time.monotonic() - t0:.0f} s")
        xfer = Transfer(tmp_path / f"stack-{uuid.uuid4().hex[:8]}.txt")
        xfer.go()
        xfer.finish()
        # chDB opens the store from one process at a time: stop the sink (it
        # flushes and commits), ask, and give it more time if the events were
        # still on their way.
        rows = []
        deadline = time.monotonic() + 120
        while True:
            time.sleep(3)
            run([*compose, "stop", "sink"], timeout=120)
            r = run([*compose, "run", "--rm", "--no-deps", "sink", "query", "transfers",
                     "--pid", str(xfer.pid), "--json"], timeout=120)
            rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            if rows or time.monotonic() > deadline:
                break
            run([*compose, "start", "sink"], timeout=120)
        assert len(rows) == 1, f"transfers of pid {xfer.pid}: {rows}\n{run([*compose, 'logs'], check=False).stdout[-5000:]}"
        (row,) = rows
        assert row["sender_pid"] == xfer.pid and row["receiver_pid"] == xfer.pid
        assert row["file"] == xfer.path and row["status"] == "delivered"
    finally:
        run([*compose, "down", "-v", "--timeout", "30"], timeout=300, check=False)
    left = run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "-q"]).stdout
    assert not left.strip()
    assert not run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"]).stdout.strip()
