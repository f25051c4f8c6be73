"""scripts/k8s_json_schemas.py: Kubernetes' OpenAPI v2 definitions -> kubeconform's per-kind schemas."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("k8s_json_schemas", ROOT / "scripts" / "k8s_json_schemas.py")
k8s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(k8s)

SWAGGER = {"definitions": {
    "io.k8s.api.apps.v1.Thing": {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "spec": {"$ref": "#/definitions/io.k8s.api.apps.v1.ThingSpec"},
        },
        "x-kubernetes-group-version-kind": [{"group": "apps", "kind": "Thing", "version": "v1"}],
    },
    "io.k8s.api.apps.v1.ThingSpec": {
        "type": "object",
        "properties": {
            "surge": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
            "cpu": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.api.resource.Quantity"},
            "child": {"$ref": "#/definitions/io.k8s.api.apps.v1.ThingSpec"},
            "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        },
    },
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": "string"},
    "io.k8s.api.core.v1.Blob": {
        "type": "object", "properties": {"apiVersion": {"type": "string"}},
        "x-kubernetes-group-version-kind": [{"group": "", "kind": "Blob", "version": "v1"}],
    },
}}


def test_convert(tmp_path):
    assert k8s.convert(SWAGGER, tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob-v1.json", "thing-apps-v1.json"]
    thing = json.loads((tmp_path / "thing-apps-v1.json").read_text())
    props = thing["properties"]
    assert props["apiVersion"]["enum"] == ["apps/v1"] and props["kind"]["enum"] == ["Thing"]
    assert json.loads((tmp_path / "blob-v1.json").read_text())["properties"]["apiVersion"]["enum"] == ["v1"]
    spec = props["spec"]
    assert thing["additionalProperties"] is False and spec["additionalProperties"] is False  # strict
    assert spec["properties"]["surge"]["oneOf"] == [{"type": "string"}, {"type": "integer"}]
    assert spec["properties"]["cpu"]["oneOf"] == [{"type": "string"}, {"type": "number"}]
    # Inlined once, then cut where the definition contains itself.
    child = spec["properties"]["child"]
    assert "properties" not in child and "recursive" in child["description"]
    assert "additionalProperties" not in spec["properties"]["free"]
    assert "$ref" not in json.dumps(thing)


def test_main_refuses_a_document_without_kinds(tmp_path, capsys):
    src = tmp_path / "swagger.json"
    src.write_text(json.dumps({"definitions": {"x": {"type": "string"}}}))
    assert k8s.main(["k8s_json_schemas.py", str(src), str(tmp_path / "out")]) == 1
    assert "no kinds found" in capsys.readouterr().err
