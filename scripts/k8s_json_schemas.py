"""Kubernetes' OpenAPI v2 document (swagger.json) -> one JSON schema per kind, for kubeconform.

    python scripts/k8s_json_schemas.py swagger.json OUT_DIR

Each kind (a definition carrying x-kubernetes-group-version-kind) gets
OUT_DIR/<kind>-<group>-<version>.json (core kinds: <kind>-<version>.json),
lower case, the file names kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}
template asks for. Every schema is:

- standalone: references are inlined, so kubeconform needs no other file. A
  definition that contains itself (CustomResourceDefinition's JSONSchemaProps)
  is cut at the second visit with an open schema.
- strict: objects with declared properties refuse any other key
  (additionalProperties: false), so a misspelt or misplaced field fails the
  check instead of being ignored, as the API server's strict field validation does.
- faithful to what the API server accepts where OpenAPI v2 cannot say it:
  int-or-string fields (format int-or-string) take a string or an integer,
  quantities (cpu: 1, memory: 2Gi) a string or a number;
  apiVersion and kind take exactly the kind's values.

scripts/install-kubeconform runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REF = "#/definitions/"
# Written as a string or a bare number in manifests (cpu: 1, memory: 2Gi);
# OpenAPI v2 only says "string".
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def _resolve(node, defs: dict, stack: tuple[str, ...]):
    """`node` with every $ref inlined and the strictness rules applied."""
    if isinstance(node, list):
        return [_resolve(n, defs, stack) for n in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if ref is not None:
        name = ref[len(REF):] if ref.startswith(REF) else None
        if name is None or name not in defs:
            raise SystemExit(f"unresolvable reference {ref!r}")
        if name in stack:
            return {"description": f"{name} (recursive; not checked deeper)"}
        if name == QUANTITY:
            return {"description": defs[name].get("description", ""), "oneOf": [{"type": "string"}, {"type": "number"}]}
        return _resolve(defs[name], defs, stack + (name,))
    if node.get("format") == "int-or-string":
        out = {k: v for k, v in node.items() if k not in ("type", "format")}
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
        return out
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: _resolve(v, defs, stack) for k, v in value.items()}
        elif key == "x-kubernetes-group-version-kind":
            continue
        else:
            out[key] = _resolve(value, defs, stack)
    if "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def file_name(gvk: dict) -> str:
    group = gvk.get("group", "").split(".")[0]
    suffix = f"-{group}-{gvk['version']}" if group else f"-{gvk['version']}"
    return f"{gvk['kind']}{suffix}.json".lower()


def convert(swagger: dict, out_dir: Path) -> int:
    defs = swagger["definitions"]
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, schema in defs.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            resolved = _resolve(schema, defs, (name,))
            props = resolved.get("properties", {})
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk.get("group") else gvk["version"]
            if "apiVersion" in props:
                props["apiVersion"] = {**props["apiVersion"], "enum": [api_version]}
            if "kind" in props:
                props["kind"] = {**props["kind"], "enum": [gvk["kind"]]}
            resolved["$schema"] = "http://json-schema.org/schema#"
            (out_dir / file_name(gvk)).write_text(json.dumps(resolved, separators=(",", ":")))
            n += 1
    return n


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    swagger = json.loads(Path(argv[1]).read_text())
    n = convert(swagger, Path(argv[2]))
    if n == 0:
        print(f"{argv[1]}: no kinds found (not a Kubernetes OpenAPI v2 document?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
