"""The C workloads of tests/c, built once per session with gcc into a temp dir.

Each program prints one JSON line: the ground truth of what it passed
(fstat of every sent and received fd). 32-bit builds need the Debian package
gcc-multilib, the io_uring one liburing-dev (scripts/setup installs both);
without them the tests that run those programs skip, or fail under
FDPASS_REQUIRE_BPF=1. A program that does not compile is always a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_bpf import REQUIRE_BPF

C_DIR = Path(__file__).parent / "c"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]

# name: (source, compiler flags, libraries, Debian package it needs beyond gcc)
PROGRAMS = {
    "xfer32": ("xfer.c", ["-m32", "-D_FILE_OFFSET_BITS=64"], [], "gcc-multilib"),
    "xfer64": ("xfer.c", [], [], None),
    "uring": ("uring.c", [], ["-luring"], "liburing-dev"),
    "race": ("race.c", ["-pthread"], [], None),
    "hidectl": ("hidectl.c", ["-pthread"], [], None),
    "peek": ("peek.c", [], [], None),
    "mixrace": ("mixrace.c", ["-pthread"], ["-luring"], "liburing-dev"),
    "uringflood": ("uringflood.c", [], ["-luring"], "liburing-dev"),
}

# package: (a program that builds only with it installed, flags, libraries)
PACKAGE_PROBES = {
    "gcc-multilib": ("#include <stdio.h>\nint main(void) { return puts(\"\") < 0; }\n", ["-m32"], []),
    "liburing-dev": ("#include <liburing.h>\n"
                     "int main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0); }\n", [], ["-luring"]),
}


def unavailable(reason: str):
    if REQUIRE_BPF:
        pytest.fail(f"FDPASS_REQUIRE_BPF=1 but {reason}")
    pytest.skip(reason)


def gcc(cc: str, src: Path, out: Path, flags: list[str], libs: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([cc, *CFLAGS, *flags, str(src), "-o", str(out), *libs], capture_output=True, text=True)


class CPrograms:
    def __init__(self, bindir: Path, missing: dict[str, str]):
        self.bindir = bindir
        self.missing = missing

    def run(self, name: str, *args: str, timeout: float = 60) -> dict:
        """Run a workload; it must exit 0 and print exactly one JSON line."""
        if name in self.missing:
            unavailable(self.missing[name])
        p = subprocess.run([str(self.bindir / name), *args], capture_output=True, text=True, timeout=timeout)
        cmd = " ".join([name, *args])
        if p.returncode != 0:
            pytest.fail(f"{cmd} exited {p.returncode}: {p.stderr.strip()}")
        lines = p.stdout.splitlines()
        if len(lines) != 1:
            pytest.fail(f"{cmd} printed {len(lines)} lines, not one JSON line: {p.stdout!r}")
        return json.loads(lines[0])


@pytest.fixture(scope="session")
def cprogs(tmp_path_factory) -> CPrograms:
    cc = shutil.which("gcc")
    if cc is None:
        unavailable("gcc is not installed (Debian package gcc; scripts/setup installs it)")
    out = tmp_path_factory.mktemp("cprogs")
    have = {}
    for pkg, (code, flags, libs) in PACKAGE_PROBES.items():
        src = out / f"probe-{pkg}.c"
        src.write_text(code)
        have[pkg] = gcc(cc, src, out / f"probe-{pkg}", flags, libs).returncode == 0
    missing = {}
    for name, (src, flags, libs, pkg) in PROGRAMS.items():
        if pkg and not have[pkg]:
            missing[name] = f"building {name} needs the Debian package {pkg} (apt-get install {pkg}, or scripts/setup)"
            continue
        p = gcc(cc, C_DIR / src, out / name, flags, libs)
        if p.returncode != 0:
            pytest.fail(f"building {name} from tests/c/{src} failed:\n{p.stderr}")
    return CPrograms(out, missing)
