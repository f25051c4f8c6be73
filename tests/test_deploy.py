"""The fleet deployment files: docker-compose.yml, Dockerfile, deploy/kubernetes/.

`docker compose config` (Compose v2; needs no Docker engine) validates the
compose file against the Compose spec and renders it; the checks below read
that rendering, so they see what Docker would run. scripts/install-compose
(called by scripts/test) installs Compose, so a missing tool is a failure
here, not a skip. The Kubernetes manifests are validated with kubeconform
against the schemas of a Kubernetes release (scripts/install-kubeconform).
The images themselves are built and run in tests/test_image.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
# The Kubernetes API the manifests are checked against (scripts/install-kubeconform's default).
KUBERNETES_VERSION = "1.34.2"

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.I)


# -- docker compose ------------------------------------------------------------

def _compose_cmd() -> list[str]:
    """`docker compose` (the CLI plugin), or the same binary run on its own."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return ["docker", "compose"]
    exe = shutil.which("docker-compose")
    if exe:
        r = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and re.search(r"\bv?2\.", r.stdout):
            return [exe]
    pytest.fail("Docker Compose v2 is missing: run scripts/install-compose (scripts/setup does)")


def _compose_config(extra_env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess:
    # A clean environment: no COMPOSE_* or FDPASS_* from the caller's shell
    # may change what the file renders to.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "FDPASS_"))}
    env.update(extra_env or {})
    return subprocess.run(
        [*_compose_cmd(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    """The rendered compose file (`docker compose config --format json`), the password set."""
    r = _compose_config({"FDPASS_CLICKHOUSE_PASSWORD": "from-the-environment"}, "--format", "json")
    assert r.returncode == 0, f"docker compose config failed:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    """The file as written (anchors resolved, ${...} not interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_config_passes():
    r = _compose_config({}, "--quiet")
    assert r.returncode == 0, f"docker compose config failed:\n{r.stderr}"


def test_compose_services(compose):
    assert set(compose["services"]) == {"kafka", "clickhouse", "collector", "sink"}
    kafka = compose["services"]["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]  # KRaft: the node is its own controller
    assert not any("ZOOKEEPER" in k for k in env)
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert compose["services"]["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    for name in ("kafka", "clickhouse"):
        assert compose["services"][name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("collector", "sink"):
        svc = compose["services"][name]
        assert svc["build"]["context"] == str(ROOT) and svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert compose["services"]["sink"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


def test_compose_collector(compose):
    c = compose["services"]["collector"]
    assert c["command"] == ["collect", "--kafka", "kafka:9092"]
    assert c["privileged"] is True
    assert c["pid"] == "host"
    mounts = {v["target"]: v for v in c["volumes"]}
    for target in ("/sys/kernel/btf", "/sys/kernel/tracing", "/sys/kernel/debug",
                   "/lib/modules", "/usr/src", "/etc/machine-id"):
        assert target in mounts, f"collector lacks the {target} mount"
        assert mounts[target]["type"] == "bind" and mounts[target]["source"] == target
        assert mounts[target].get("read_only") is True, f"{target} should be read-only"
    spool = mounts["/var/lib/fdpass/spool"]
    assert spool["type"] == "volume" and spool["source"] in compose["volumes"]


def test_compose_sink(compose):
    s = compose["services"]["sink"]
    assert s["command"] == ["sink", "--kafka", "kafka:9092", "--clickhouse", "http://default@clickhouse:8123/fdpass"]
    # The password comes from the environment, and reaches both ends.
    assert s["environment"]["FDPASS_CLICKHOUSE_PASSWORD"] == "from-the-environment"
    assert compose["services"]["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"] == "from-the-environment"


def test_compose_no_secrets_inline(compose_raw):
    text = COMPOSE_FILE.read_text()
    for name, svc in compose_raw["services"].items():
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{FDPASS_[A-Z_]+(:-[^}]*)?\}", str(value)), \
                    f"{name}: {key} must come from the environment (${{VAR}}), not be written in the file"
        for arg in svc.get("command") or []:
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", arg), f"{name}: credentials in a URL on the command line"
    # The one literal allowed is the local default, and it says so.
    defaults = re.findall(r"\$\{FDPASS_CLICKHOUSE_PASSWORD:-([^}]*)\}", text)
    assert len(defaults) == 1 and "local" in defaults[0]
    assert "LOCAL DEFAULT" in text


def test_compose_published_ports_are_loopback(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port['target']} beyond loopback"


# -- the image -----------------------------------------------------------------

def _package_dirs() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["tool"]["setuptools"]["package-dir"].values())


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f in ("${DEBIAN_IMAGE}",) or f.startswith("debian:bookworm") for f in froms)
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:bookworm", text, re.M)
    assert "python3-bpfcc" in text
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/fdpass-entrypoint"\]', text, re.M)
    final = text[text.rindex("\nFROM "):]
    # No compiler in the final image: the headers (which pull in gcc) come from a stage.
    assert "linux-headers" not in final.split("COPY --from=headers")[0]
    assert not re.search(r"\b(build-essential|gcc|clang)\b", final.replace("libclang", ""))
    # Every package directory is copied into the image, and let through .dockerignore.
    copied = set(re.findall(r"^COPY (\w+) /src/\1$", text, re.M))
    missing = _package_dirs() - copied
    assert not missing, f"Dockerfile does not COPY {sorted(missing)}"
    # The C accelerators are built into the wheel in a stage, and the final
    # image refuses to build without every one doctor knows of.
    from fdpass.collector.doctor import ACCELERATORS

    assert re.search(r"^COPY pyproject.toml setup.py ", text, re.M)
    for module, _ in ACCELERATORS:
        assert f"import {module}" in final or f", {module}" in final, f"the image does not check {module}"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!setup.py" in ignore and "**/*.so" in ignore  # built in the image, never copied from the host
    for d in _package_dirs() | {"deploy/docker/entrypoint.sh"}:
        assert f"!{d}/" in ignore or f"!{d}" in ignore, f".dockerignore excludes {d}"


SCRIPTS = (
    ("deploy/docker/entrypoint.sh", "sh"),
    ("deploy/docker/kafka/kafka-entrypoint", "sh"),
    ("deploy/docker/kafka/kafka-ready", "sh"),
    ("scripts/install-compose", "bash"),
    ("scripts/install-kubeconform", "bash"),
    ("scripts/docker-engine", "bash"),
    ("scripts/build-image", "bash"),
)


def test_scripts_parse():
    for script, shell in ((ROOT / s, sh) for s, sh in SCRIPTS):
        r = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{script}: {r.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


# -- Kubernetes ----------------------------------------------------------------

def _kubeconform(*paths: str | Path) -> subprocess.CompletedProcess:
    """kubeconform -strict against the schemas scripts/install-kubeconform made."""
    inst = subprocess.run(["bash", str(ROOT / "scripts/install-kubeconform")], capture_output=True, text=True, timeout=900)
    assert inst.returncode == 0, f"scripts/install-kubeconform failed:\n{inst.stderr}"
    location = inst.stdout.strip().splitlines()[-1]
    exe = shutil.which("kubeconform") or "/usr/local/bin/kubeconform"
    return subprocess.run([exe, "-strict", "-summary", "-kubernetes-version", KUBERNETES_VERSION,
                           "-schema-location", location, *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    r = _kubeconform(K8S_DIR)
    assert r.returncode == 0, f"kubeconform:\n{r.stdout}{r.stderr}"
    n = sum(1 for f in K8S_DIR.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d)
    # Every object was checked, none skipped for want of a schema.
    assert f"Valid: {n}, Invalid: 0, Errors: 0, Skipped: 0" in r.stdout, r.stdout


@pytest.mark.parametrize("change, complaint", [
    # A misspelt field the API server would drop or refuse.
    (("terminationGracePeriodSeconds: 30", "terminationGracePeriodSecond: 30"), "terminationGracePeriodSecond"),
    # A field in the wrong place.
    (("hostPID: true", "hostPID: true\n      hostPort: 1"), "hostPort"),
    # A wrong type.
    (("cpu: 100m", "cpu: [100m]"), "cpu"),
])
def test_kubeconform_refuses_a_broken_manifest(tmp_path, change, complaint):
    text = (K8S_DIR / "daemonset.yaml").read_text()
    assert change[0] in text
    bad = tmp_path / "daemonset.yaml"
    bad.write_text(text.replace(change[0], change[1], 1))
    r = _kubeconform(bad)
    assert r.returncode == 1 and "Invalid: 1" in r.stdout and complaint in r.stdout, r.stdout

@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    """Every object in deploy/kubernetes/*.yaml, by (kind, name)."""
    objs = {}
    files = sorted(K8S_DIR.glob("*.yaml"))
    assert {f.name for f in files} >= {"daemonset.yaml", "sink.yaml"}
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{f.name}: not a Kubernetes object: {doc}"
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objs, f"{key} defined twice"
            objs[key] = doc
    return objs


def _check_pod(pod: dict, objs: dict) -> None:
    """References inside a pod spec resolve: mounts to volumes, $(VARS) to env, config maps exist."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']}: mount of an undefined volume {m['name']}"
        env_names = {e["name"] for e in c.get("env", [])}
        for ref in re.findall(r"\$\((\w+)\)", " ".join(c.get("args", []) + c.get("command", []))):
            assert ref in env_names, f"{c['name']}: $({ref}) is not defined in env"
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{c['name']}: {e['name']} must come from a Secret"
            cm = e.get("valueFrom", {}).get("configMapKeyRef")
            if cm:
                assert cm["key"] in objs[("ConfigMap", cm["name"])]["data"]
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                assert ("ConfigMap", src["configMapRef"]["name"]) in objs
        res = c.get("resources", {})
        assert res.get("requests") and res.get("limits"), f"{c['name']}: set resource requests and limits"


def test_k8s_no_secrets_inline(k8s):
    assert not [k for k in k8s if k[0] == "Secret"], "Secrets are created by the operator, not kept in the repo"
    for (kind, name), obj in k8s.items():
        if kind == "ConfigMap":
            for key in obj["data"]:
                assert not SECRET_NAME.search(key), f"ConfigMap {name}: {key} belongs in a Secret"


def test_k8s_collector_daemonset(k8s):
    ds = k8s[("DaemonSet", "fdpass-collector")]
    pod = ds["spec"]["template"]["spec"]
    _check_pod(pod, k8s)
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert pod["hostPID"] is True
    assert {"operator": "Exists"} in pod["tolerations"]  # every node, whatever its taints
    (c,) = pod["containers"]
    assert c["args"][:3] == ["collect", "--kafka", "$(KAFKA_BOOTSTRAP)"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KAFKA_BOOTSTRAP"]["valueFrom"]["configMapKeyRef"]["name"] == "fdpass-kafka"
    assert env["FDPASS_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    # events name the node, not the pod
    assert env["FDPASS_HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    sc = c["securityContext"]
    if not sc.get("privileged"):
        assert {"BPF", "PERFMON"} <= set(sc["capabilities"]["add"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/btf", "/sys/kernel/tracing", "/sys/kernel/debug",
                 "/lib/modules", "/usr/src", "/etc/machine-id"):
        assert path in mounts, f"collector lacks the {path} mount"
        assert mounts[path].get("readOnly") is True
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    # The spool is on the node, so it outlives the pod.
    spool = mounts["/var/lib/fdpass/spool"]
    assert volumes[spool["name"]]["hostPath"]["path"] == "/var/lib/fdpass/spool"
    # updates with no gap: the new pod takes over from the old (collector/handover.py), ready only then
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert c["args"][c["args"].index("--after-handover") + 1] == "wait"
    ready = c["args"][c["args"].index("--ready-file") + 1]
    assert c["readinessProbe"]["exec"]["command"] == ["test", "-e", ready]
    assert not spool.get("readOnly")


def test_k8s_sink_deployment(k8s):
    dep = k8s[("Deployment", "fdpass-sink")]
    pod = dep["spec"]["template"]["spec"]
    _check_pod(pod, k8s)
    (c,) = pod["containers"]
    assert c["args"][0] == "sink"
    env = {e["name"]: e for e in c["env"]}
    assert env["FDPASS_CLICKHOUSE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    dsn = k8s[("ConfigMap", "fdpass-sink")]["data"]["CLICKHOUSE_DSN"]
    assert re.fullmatch(r"https?://\w+@[\w.-]+:\d+/\w+", dsn), "the DSN names a user but never a password"
    assert not pod.get("hostPID") and not c.get("securityContext", {}).get("privileged")
