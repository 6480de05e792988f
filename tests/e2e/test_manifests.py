"""The Kubernetes files under docs/kubernetes are valid.

Every manifest (*.yaml but not *.values.yaml) is validated, offline, against
the Kubernetes API schemas that kubernetes-validate ships, in strict mode
(unknown fields are errors), for the oldest version with native sidecars
on by default (1.29), the version they became GA in (1.33), and the newest
the package knows. Helm values files are not manifests: they must parse,
and the container fields they hand to the ioc-instance chart are validated
inside a Pod the way the chart would place them.
"""

from pathlib import Path

import kubernetes_validate as kv  # pinned in scripts/setup.sh
import pytest
import yaml  # PyYAML comes with kubernetes-validate

DOCS = Path(__file__).resolve().parents[2] / "docs" / "kubernetes"
MANIFESTS = sorted(p for p in DOCS.glob("*.yaml") if not p.name.endswith(".values.yaml"))
VALUES = sorted(DOCS.glob("*.values.yaml"))
VERSIONS = ["1.29.0", "1.33.0", kv.latest_version()]


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_there_are_manifests_and_values_files():
    assert len(MANIFESTS) >= 4, MANIFESTS
    assert len(VALUES) >= 2, VALUES


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path, version):
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        kv.validate(doc, version, strict=True)


def test_validation_rejects_a_misspelt_field():
    # The check above means something only if strict validation fails on
    # a field Kubernetes does not know.
    (doc,) = documents(DOCS / "sidecar-statefulset.yaml")
    doc["spec"]["template"]["spec"]["initContainers"][0]["startupProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, "1.33.0", strict=True)


def test_native_sidecar_starts_probed_before_the_ioc():
    (doc,) = documents(DOCS / "sidecar-statefulset.yaml")
    (shim,) = doc["spec"]["template"]["spec"]["initContainers"]
    assert shim["restartPolicy"] == "Always"
    assert shim["startupProbe"]["httpGet"]["path"] == "/healthz"
    port = shim["startupProbe"]["httpGet"]["port"]
    assert port in [p["name"] for p in shim["ports"]]


CHART_CONTAINER_KEYS = ["command", "args", "readinessProbe", "livenessProbe", "startupProbe"]


@pytest.mark.parametrize("path", VALUES, ids=lambda p: p.name)
def test_values_file_parses_and_its_containers_are_valid(path):
    (values,) = documents(path)
    ioc = values["ioc-instance"]
    assert ioc["hostNetwork"] is False, "the chart's Service exists only without hostNetwork"
    # The IOC container as templates/_statefulset.tpl builds it from values.
    main = {"name": "ioc", "image": ioc["image"], "stdin": True, "tty": True}
    main.update({k: ioc[k] for k in CHART_CONTAINER_KEYS if k in ioc})
    main["env"] = [{"name": e["name"], "value": str(e["value"])} for e in ioc.get("env", [])]
    extra = [{**c, "workingDir": "/tmp"} for c in ioc.get("extraContainers", [])]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ioc"}, "spec": {"containers": [main, *extra]}}
    kv.validate(pod, "1.33.0", strict=True)
    # Whichever container runs the shim serves TCP 5076, the port the
    # chart's Service forwards.
    shim_argv = [a for c in pod["spec"]["containers"] for a in c.get("command", []) + c.get("args", [])]
    assert "--listen=0.0.0.0:5076" in shim_argv, shim_argv
