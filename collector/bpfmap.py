"""The probes' program-map picture, generated from the BPF source.

Which BPF program reads, updates or deletes which map, which ones emit
records and which tail-call which: read from bpf/*.bpf.c (and the local
headers they include) and from the loader (collector/probes.py, which fills
the program arrays), rendered as Mermaid diagrams into docs/bpf-programs.md.
`python -m fdpass.collector.bpfmap --check` fails when that file is stale; a
unit test runs the check, so the picture cannot drift from the code.

The C is read with a small scanner, not a compiler: it knows bcc's map
declarations (BPF_ARRAY, BPF_HASH, BPF_TABLE, ...), its program macros
(TRACEPOINT_PROBE, RAW_TRACEPOINT_PROBE, KFUNC_PROBE, ...), `static`
helper functions and calls between them, and map method calls
(`name.lookup(`). That is all the BPF C of this project uses.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BPF_DIR = REPO / "bpf"
LOADER = REPO / "collector" / "probes.py"
OUTPUT = REPO / "docs" / "bpf-programs.md"

_MAP_DECL = re.compile(
    r"^\s*(BPF_ARRAY|BPF_HASH|BPF_PERCPU_ARRAY|BPF_PROG_ARRAY|BPF_RINGBUF_OUTPUT|BPF_TABLE)\((.*?)\);", re.M)
_MAP_KIND = {"BPF_ARRAY": "array", "BPF_HASH": "hash", "BPF_PERCPU_ARRAY": "percpu array",
             "BPF_PROG_ARRAY": "prog array", "BPF_RINGBUF_OUTPUT": "ring buffer"}
# Program entry points, each with how it is attached.
_PROGRAMS = (
    (re.compile(r"^TRACEPOINT_PROBE\((\w+),\s*(\w+)\)\s*\{", re.M), lambda m: f"tracepoint {m[1]}:{m[2]}"),
    (re.compile(r"^RAW_TRACEPOINT_PROBE\((\w+)\)\s*\{", re.M), lambda m: f"raw_tracepoint {m[1]}"),
    (re.compile(r"^KFUNC_PROBE\((\w+)[^)]*\)\s*\{", re.M), lambda m: f"fentry {m[1]}"),
    (re.compile(r"^KRETFUNC_PROBE\((\w+)[^)]*\)\s*\{", re.M), lambda m: f"fexit {m[1]}"),
    (re.compile(r"^LSM_PROBE\((\w+)[^)]*\)\s*\{", re.M), lambda m: f"lsm {m[1]}"),
    (re.compile(r"^int (kprobe__\w+|kretprobe__\w+)\([^)]*\)\s*\{", re.M), lambda m: m[1].replace("__", " ", 1)),
    (re.compile(r"^int (\w+)\(\s*(?:void|struct \w+) \*ctx[^)]*\)\s*\{", re.M), lambda m: f"tail-called {m[1]}"),
)
_FUNC = re.compile(r"^static __always_inline [\w\s\*]+?\b(\w+)\(([^;{]*?)\)\s*\{", re.M)
_METHOD = re.compile(r"\b(\w+)\.(lookup|update|insert|delete|call|ringbuf_output|ringbuf_reserve|lookup_or_try_init)\(")
_CALL = re.compile(r"\b(\w+)\(")
_OP_VERB = {"lookup": "look up", "lookup_or_try_init": "look up", "update": "update", "insert": "update",
            "delete": "delete", "ringbuf_output": "emit", "ringbuf_reserve": "emit", "call": "tail call"}


@dataclass
class Unit:
    """One .bpf.c file with its local headers: maps, functions, programs."""
    name: str
    maps: dict[str, str] = field(default_factory=dict)  # name -> kind
    bodies: dict[str, str] = field(default_factory=dict)  # function or program id -> body
    programs: dict[str, str] = field(default_factory=dict)  # program id -> how attached


def _with_headers(path: Path, seen: set[Path] | None = None) -> str:
    seen = seen if seen is not None else set()
    seen.add(path)
    text = path.read_text()
    for inc in re.findall(r'^#include "([^"]+)"', text, re.M):
        p = path.parent / inc
        if p.exists() and p not in seen:
            text = _with_headers(p, seen) + "\n" + text
    return text


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m[0].count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _body(text: str, open_brace: int) -> str:
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace:i + 1]
    raise ValueError("unbalanced braces in BPF source")


def scan(path: Path) -> Unit:
    text = _strip_comments(_with_headers(path))
    unit = Unit(path.name)
    for macro, args in _MAP_DECL.findall(text):
        parts = [a.strip() for a in args.split(",")]
        if macro == "BPF_TABLE":
            unit.maps[parts[3]] = parts[0].strip('"').replace("_", " ")
        else:
            unit.maps[parts[0]] = _MAP_KIND[macro]
    for m in _FUNC.finditer(text):
        unit.bodies[m[1]] = _body(text, m.end() - 1)
    for pattern, how in _PROGRAMS:
        for m in pattern.finditer(text):
            name = m[1] if "tail-called" in how(m) or how(m).startswith(("kprobe", "kretprobe")) else how(m)
            unit.programs[name] = how(m)
            unit.bodies[name] = _body(text, m.end() - 1)
    return unit


def map_ops(unit: Unit, func: str, _stack: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(map, verb) in source order, through the helpers func calls."""
    out: list[tuple[str, str]] = []
    body = unit.bodies.get(func, "")
    events = [(m.start(), ("op", m[1], m[2])) for m in _METHOD.finditer(body) if m[1] in unit.maps]
    events += [(m.start(), ("call", m[1])) for m in _CALL.finditer(body)
               if m[1] in unit.bodies and m[1] not in unit.programs and m[1] not in _stack and m[1] != func]
    for _pos, ev in sorted(events):
        if ev[0] == "op":
            out.append((ev[1], _OP_VERB[ev[2]]))
        else:
            out += map_ops(unit, ev[1], _stack + (func,))
    return out


def tail_targets(loader_text: str) -> dict[str, str]:
    """prog array -> the function the loader puts in it (collector/probes.py)."""
    loaded = dict(re.findall(r'(\w+) = self\.bpf\.load_func\(b"(\w+)"', loader_text))
    out = {}
    for array, var in re.findall(r'self\.bpf\[b"(\w+)"\]\[[^]]*\]\s*=\s*ctypes\.c_int\((\w+)\.fd\)', loader_text):
        if var in loaded:
            out[array] = loaded[var]
    return out


def _node(name: str) -> str:
    return re.sub(r"\W", "_", name)


def render(units: list[Unit], targets: dict[str, str]) -> str:
    lines = ["# BPF programs and maps", "",
             "Generated by `python -m fdpass.collector.bpfmap` from `bpf/*.bpf.c` and `collector/probes.py`; "
             "do not edit (a test fails when it is stale). What each program may look up (and write through the "
             "pointer), update, delete and emit, through the helpers it calls, on any of its branches (a "
             "sendmsg's exit shows the receive side's operations too); tail calls dashed; `#if` variants "
             "(io_uring_submit_sqe or _req) both shown. One file per capture backend: fdpass.bpf.c is the tracepoint "
             "backend, fdpass_kernel.bpf.c the kernel (fentry/fexit) one, whose fexit programs on receive_fd and "
             "__receive_fd are alternatives (the loader attaches the one this kernel has). The reasons are in "
             "[kernel.md](kernel.md).", ""]
    for unit in units:
        lines += [f"## {unit.name}", "", "```mermaid", "flowchart LR"]
        for prog, how in sorted(unit.programs.items()):
            lines.append(f'  {_node(prog)}["{how}"]')
        for name, kind in sorted(unit.maps.items()):
            lines.append(f'  m_{_node(name)}[("{name}<br/>{kind}")]')
        for prog in sorted(unit.programs):
            verbs: dict[str, list[str]] = {}
            for m, verb in map_ops(unit, prog):
                if verb == "tail call":
                    continue
                verbs.setdefault(m, [])
                if verb not in verbs[m]:
                    verbs[m].append(verb)
            for m, vs in verbs.items():
                lines.append(f'  {_node(prog)} -- "{", ".join(vs)}" --> m_{_node(m)}')
            for m, verb in map_ops(unit, prog):
                if verb == "tail call" and targets.get(m) in unit.programs:
                    edge = f"  {_node(prog)} -. {m} .-> {_node(targets[m])}"
                    if edge not in lines:
                        lines.append(edge)
        lines += ["```", ""]
        lines += _sequence(unit, targets)
    return "\n".join(lines).rstrip() + "\n"


# One SCM_RIGHTS transfer (a stream socket's sendmsg, then recvmsg) in the
# order the hooks fire, for each backend (a unit shows the steps it has):
# the programs to show, each with its map operations as the source has them.
_SEQUENCE = (
    # tracepoint backend (fdpass.bpf.c)
    ("sender", "tracepoint syscalls:sys_enter_sendmsg"),
    ("sender", "raw_tracepoint sched_waking"),
    ("sender", "tracepoint syscalls:sys_exit_sendmsg"),
    ("receiver", "tracepoint syscalls:sys_enter_recvmsg"),
    ("receiver", "tracepoint syscalls:sys_exit_recvmsg"),
    # kernel backend (fdpass_kernel.bpf.c); the kernel has receive_fd or __receive_fd
    ("sender", "fentry __scm_send"),
    ("sender", "fexit fget_raw"),
    ("sender", "fexit __scm_send"),
    ("sender", "fexit scm_fp_dup"),
    ("sender", "fexit unix_stream_sendmsg"),
    ("sender", "fexit __sys_sendmsg"),
    ("receiver", "fentry scm_detach_fds"),
    ("receiver", "fexit receive_fd"),
    ("receiver", "fexit __receive_fd"),
    ("receiver", "fexit scm_detach_fds"),
    ("receiver", "fexit unix_stream_recvmsg"),
    ("receiver", "fexit __sys_recvmsg"),
)


def _sequence(unit: Unit, targets: dict[str, str]) -> list[str]:
    by_how = {how: prog for prog, how in unit.programs.items()}
    steps = [(who, by_how[how]) for who, how in _SEQUENCE if how in by_how]
    if not steps:
        return []
    lines = ["One transfer (sendmsg, then recvmsg), hook by hook:", "", "```mermaid", "sequenceDiagram",
             "  participant S as sender", "  participant R as receiver"]
    used = []
    for _who, prog in steps:
        for m, _verb in map_ops(unit, prog):
            if m not in used and unit.maps[m] != "prog array":
                used.append(m)
    for m in used:
        lines.append(f"  participant {_node(m)} as {m}")
    for who, prog in steps:
        actor = "S" if who == "sender" else "R"
        lines.append(f"  Note over {actor}: {unit.programs[prog]}")
        seen = []
        ops = list(map_ops(unit, prog))
        for m, verb in ops:
            if verb == "tail call":
                target = targets.get(m)
                if target:
                    ops += [(tm, tv) for tm, tv in map_ops(unit, target) if tv != "tail call"]
                continue
            if (m, verb) in seen:
                continue
            seen.append((m, verb))
            lines.append(f"  {actor}->>{_node(m)}: {verb}")
    lines += ["```", ""]
    return lines


def generate() -> str:
    units = [scan(p) for p in sorted(BPF_DIR.glob("*.bpf.c"))]
    return render(units, tail_targets(LOADER.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fdpass.collector.bpfmap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT.relative_to(REPO)} is not current")
    args = ap.parse_args(argv)
    text = generate()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(REPO)} is stale: run python -m fdpass.collector.bpfmap", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
