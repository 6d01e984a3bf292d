"""deploy/kubernetes: every manifest is valid for the `kubernetes` client's
models, gateway arguments parse with smg's CLI, and the pieces agree with
each other (labels vs selectors, RBAC vs service accounts, ports vs the
Dockerfile)."""

import glob
import os
import re

import pytest
import yaml
from kubernetes import client

from smg._fast.selector import parse_selector_items
from smg.cli import config_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml")))
MODELS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}


def docs():
    out = []
    for path in MANIFESTS:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    out.append((os.path.basename(path), doc))
    return out


def strip_none(x):
    if isinstance(x, dict):
        return {k: strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [strip_none(v) for v in x]
    return x


def test_manifests_exist():
    names = {os.path.basename(p) for p in MANIFESTS}
    assert {"rbac.yaml", "rbac-cluster.yaml", "gateway.yaml", "worker-statefulset.yaml", "pd.yaml"} <= names


@pytest.mark.parametrize("name, doc", docs(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_manifest_round_trips_through_the_client_models(name, doc):
    model = MODELS[(doc["apiVersion"], doc["kind"])]
    api = client.ApiClient()
    obj = api._ApiClient__deserialize(doc, model)
    # a field the model does not know would be dropped: the round trip shows it
    assert strip_none(api.sanitize_for_serialization(obj)) == strip_none(doc)


def gateway_containers():
    for name, doc in docs():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == "smg":
                    yield name, doc, c


def test_gateway_args_parse_and_match_the_image():
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    assert 'ENTRYPOINT ["smg"]' in dockerfile
    exposed = set(re.findall(r"EXPOSE ([\d ]+)", dockerfile)[0].split())
    found = 0
    for name, doc, c in gateway_containers():
        found += 1
        assert "command" not in c  # the image's ENTRYPOINT is smg; args are its flags
        cfg = config_from_args(c["args"])
        assert cfg.service_discovery
        ports = {p["containerPort"] for p in c["ports"]}
        assert ports == {cfg.port, cfg.prometheus_port} == {int(p) for p in exposed}
        probe_port = c["readinessProbe"]["httpGet"]["port"]
        assert probe_port == "http" and any(p["name"] == "http" and p["containerPort"] == cfg.port for p in c["ports"])
        sa = doc["spec"]["template"]["spec"]["serviceAccountName"]
        assert sa == "smg"
    assert found == 2


def pod_templates():
    for name, doc in docs():
        if doc["kind"] == "StatefulSet":
            yield doc["metadata"]["namespace"], doc["spec"]["template"]


def test_gateway_selectors_find_the_example_workers():
    templates = list(pod_templates())
    for name, doc, c in gateway_containers():
        cfg = config_from_args(c["args"])
        ns = cfg.service_discovery_namespace
        if cfg.pd_disaggregation:
            prefill = parse_selector_items(cfg.prefill_selector)
            decode = parse_selector_items(cfg.decode_selector)
            roles = [("prefill" if prefill.matches(t["metadata"]["labels"])
                      else "decode" if decode.matches(t["metadata"]["labels"]) else None)
                     for tns, t in templates if tns == ns]
            assert "prefill" in roles and "decode" in roles
            for tns, t in templates:
                if prefill.matches(t["metadata"]["labels"]):
                    ann = t["metadata"].get("annotations", {})
                    assert cfg.bootstrap_port_annotation in ann
                    bootstrap = int(ann[cfg.bootstrap_port_annotation])
                    ports = {p["containerPort"] for c2 in t["spec"]["containers"] for p in c2["ports"]}
                    assert bootstrap in ports
        else:
            sel = parse_selector_items(cfg.selector)
            matched = [t for tns, t in templates if tns == ns and sel.matches(t["metadata"]["labels"])]
            assert matched
            for t in matched:
                ports = {p["containerPort"] for c2 in t["spec"]["containers"] for p in c2["ports"]}
                assert cfg.service_discovery_port in ports


def test_rbac_grants_what_discovery_needs():
    by_kind = {}
    for name, doc in docs():
        by_kind.setdefault(doc["kind"], []).append(doc)
    for role in by_kind["Role"] + by_kind["ClusterRole"]:
        rules = role["rules"]
        assert any(r["apiGroups"] == [""] and "pods" in r["resources"]
                   and {"get", "list", "watch"} <= set(r["verbs"]) for r in rules)
    sa = by_kind["ServiceAccount"][0]["metadata"]
    for binding in by_kind["RoleBinding"] + by_kind["ClusterRoleBinding"]:
        subject = binding["subjects"][0]
        assert (subject["kind"], subject["name"], subject["namespace"]) == ("ServiceAccount", sa["name"],
                                                                            sa["namespace"])
        kind = binding["roleRef"]["kind"]
        assert any(r["metadata"]["name"] == binding["roleRef"]["name"] for r in by_kind[kind])
    role = by_kind["Role"][0]["metadata"]
    for name, doc, c in gateway_containers():
        # the namespaced Role covers the namespace the gateway watches
        assert config_from_args(c["args"]).service_discovery_namespace == role["namespace"]


def test_the_gateway_runs_replicated_and_survives_disruptions():
    by_kind = {}
    for name, doc in docs():
        by_kind.setdefault(doc["kind"], []).append((name, doc))
    deployments = {doc["metadata"]["name"]: doc for name, doc in by_kind["Deployment"]}
    gateway = deployments["smg"]
    spec = gateway["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (_, pdb), = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]
    (_, hpa), = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "smg"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (c,) = [c for c in pod["containers"] if c["name"] == "smg"]
    cfg = config_from_args(c["args"])
    # preStop delay + the drain fit in the termination grace period
    assert pod["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + \
        cfg.shutdown_grace_period_secs
    # one data-plane process per requested CPU
    assert cfg.workers == int(c["resources"]["requests"]["cpu"])
