"""`fdpass query graph`: the hand-off graph of a question's transfers, as DOT, SVG or PNG.

Nodes are processes (comm, pid, container), edges hand-offs labelled with
the file and how many times it went that way. A graph of more than
`max_nodes` processes is collapsed to one node per (comm, container), and
only the `max_edges` busiest edges are drawn; the graph's caption says so.
SVG and PNG come from Graphviz's `dot` (Debian's graphviz, installed by
scripts/setup); DOT needs nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

FORMATS = {".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}
LOST = ("(not received)",)


def _quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short(container: str | None) -> str:
    return (container or "")[:12]


def build_dot(transfers: list[dict], *, title: str = "fdpass hand-offs", max_nodes: int = 60,
              max_edges: int = 100) -> tuple[str, list[str]]:
    """(DOT text, remarks). `transfers`: rows of questions.HOPS (s_*/r_* columns)."""
    remarks = []

    def proc(side: str, t: dict, collapsed: bool) -> tuple:
        if side == "r" and not t["delivered"]:
            return LOST
        key = (t["host"], t[f"{side}_comm"], _short(t[f"{side}_container"]))
        return key if collapsed else key + (t[f"{side}_pid"],)

    procs = {proc(side, t, False) for t in transfers for side in ("s", "r")} - {LOST}
    collapsed = len(procs) > max_nodes
    if collapsed:
        remarks.append(f"{len(procs)} processes: collapsed to one node per comm and container")
    edges: Counter = Counter()
    files: dict[tuple, Counter] = {}
    for t in transfers:
        e = (proc("s", t, collapsed), proc("r", t, collapsed))
        edges[e] += 1
        files.setdefault(e, Counter())[t["s_file"]] += 1
    shown = edges.most_common(max_edges)
    if len(edges) > max_edges:
        remarks.append(f"{len(edges)} edges: only the {max_edges} busiest are drawn")
    hosts = {n[0] for e, _ in shown for n in e if n != LOST}
    caption = title + ("\\n" + "; ".join(remarks) if remarks else "")

    def label(n: tuple) -> str:
        if n == LOST:
            return n[0]
        host, comm, container = n[:3]
        lines = [comm or "?"]
        if len(n) > 3:
            lines.append(f"pid {n[3]}")
        if container:
            lines.append(f"container {container}")
        if len(hosts) > 1:
            lines.append(host)
        return "\\n".join(_quote(x)[1:-1] for x in lines)

    ids: dict[tuple, str] = {}
    lines = ["digraph fdpass {", "  rankdir=LR;", "  label=\"" + caption.replace('"', "'") + "\";", "  labelloc=t;",
             '  node [shape=box, style="rounded", fontname="Helvetica"];', '  edge [fontname="Helvetica"];']
    for (a, b), _ in shown:
        for n in (a, b):
            if n not in ids:
                ids[n] = f"n{len(ids)}"
                extra = ", shape=plaintext" if n == LOST else ""
                lines.append(f'  {ids[n]} [label="{label(n)}"{extra}];')
    for (a, b), count in shown:
        top = files[a, b].most_common(2)
        text = top[0][0] + (f" (+{len(files[a, b]) - 1} more files)" if len(files[a, b]) > 1 else "")
        text += f" x{count}" if count > 1 else ""
        style = ", style=dashed" if b == LOST else ""
        lines.append(f"  {ids[a]} -> {ids[b]} [label={_quote(text)}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n", remarks


def output_format(path: str) -> str:
    from fdpass.errors import UserError

    if path == "-":
        return "dot"
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"--output {path}: name a .svg, .png or .dot file, or - for DOT on stdout")
    return FORMATS[ext]


def write(dot: str, path: str, out) -> None:
    """DOT to `out` (path '-') or to a .dot file; SVG/PNG through Graphviz's dot."""
    from fdpass.errors import UserError

    fmt = output_format(path)
    if path == "-":
        out.write(dot)
        return
    if fmt == "dot":
        with open(path, "w") as f:
            f.write(dot)
        return
    exe = shutil.which("dot")
    if exe is None:
        raise UserError("rendering SVG/PNG needs Graphviz's `dot` (apt-get install graphviz; scripts/setup "
                        "installs it), or write DOT with --output FILE.dot or --output -")
    r = subprocess.run([exe, f"-T{fmt}", "-o", path], input=dot.encode(), capture_output=True, timeout=120)
    if r.returncode != 0:
        raise UserError(f"Graphviz dot failed: {r.stderr.decode(errors='replace').strip()[:500]}")
