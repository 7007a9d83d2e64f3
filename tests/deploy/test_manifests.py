"""deploy/: rendered kustomizations are schema-valid, restricted, least-privileged and in sync with
their sources of truth (the CRD, the policy, the RBAC generated from the policy)."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import BASE, REPO, Doc, Rendered, pod_templates
from .operator_schemas import SCHEMAS as OPERATOR_SCHEMAS

K8S_VERSION = "1.32.0"
NAMESPACE = "apiproxy-system"
ISTIO_NAMESPACE = "istio-system"
PROXY_ARGS = [
    "serve",
    "--listen", "0.0.0.0:4443",
    "--tls-cert", "/etc/apiproxy/tls/tls.crt",
    "--tls-key", "/etc/apiproxy/tls/tls.key",
    "--peers", "/etc/apiproxy/peers/peers.yaml",
    "--cluster-uuid", "$(CLUSTER_UUID)",
    "--policy", "/etc/apiproxy/policy/policy.yaml",
    "--audit-log", "-",
    "--metrics-listen", "0.0.0.0:9090",
]  # fmt: skip
FEDERATION_ARGS = [
    "federate",
    "--cluster-domain", "cluster.local",
    "--namespace", NAMESPACE,
    "--istio-namespace", ISTIO_NAMESPACE,
    "--api-host", "$(API_HOST)",
    "--exporter-listen", "0.0.0.0:8443",
    "--metrics-listen", "0.0.0.0:9091",
    "--leader-elect",
]  # fmt: skip
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
}


# --- schemas -----------------------------------------------------------------------------------


def custom_schemas(r: Rendered) -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> openAPIV3Schema for every CRD the rendering itself installs."""
    out: dict[tuple[str, str], Doc] = {}
    for crd in r.of_kind("CustomResourceDefinition"):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def test_every_object_is_valid_for_kubernetes_1_32(rendered: Rendered) -> None:
    customs = custom_schemas(rendered)
    for doc in rendered.docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in customs:  # CRD-backed kinds: the CRD's own schema, not the built-in ones
            jsonschema.validate(doc, customs[key])
            continue
        if key in OPERATOR_SCHEMAS:  # prometheus-operator kinds: a strict hand-written subset
            jsonschema.validate(doc, OPERATOR_SCHEMAS[key])
            continue
        # strict: unknown fields are errors too (a typo'd field would silently do nothing)
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{rendered.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_schema_validation_catches_a_broken_deployment(rendered_all: dict[str, Rendered]) -> None:
    """The validator is really strict: an unknown container field is refused."""
    deployment = rendered_all["base"].get("Deployment", "api-proxy")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_example_istiomulticluster_matches_the_crd() -> None:
    crd = yaml.safe_load((BASE / "crd-istiomulticluster.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    example = yaml.safe_load((REPO / "deploy" / "examples" / "istiomulticluster.yaml").read_text())
    assert (example["apiVersion"], example["kind"]) == (
        "deckhouse.io/v1alpha1",
        "IstioMulticluster",
    )
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "spec": {"metadataEndpoint": "ftp://x"}}, schema)


# --- copies of sources of truth ------------------------------------------------------------------


def test_crd_is_a_verbatim_copy_of_the_federation_crd() -> None:
    source = REPO / "apiproxy" / "federation" / "crd.yaml"
    assert source.exists(), "apiproxy/federation/crd.yaml (the source of truth) is missing"
    assert (BASE / "crd-istiomulticluster.yaml").read_bytes() == source.read_bytes(), (
        "deploy/base/crd-istiomulticluster.yaml drifted: "
        "cp apiproxy/federation/crd.yaml deploy/base/crd-istiomulticluster.yaml"
    )


def test_policy_configmap_is_a_verbatim_copy_of_the_policy() -> None:
    source = REPO / "policies" / "istio-remote.yaml"
    assert source.exists(), "policies/istio-remote.yaml (the source of truth) is missing"
    assert (BASE / "policy" / "istio-remote.yaml").read_bytes() == source.read_bytes(), (
        "deploy/base/policy/istio-remote.yaml drifted: "
        "cp policies/istio-remote.yaml deploy/base/policy/istio-remote.yaml"
    )


def test_policy_configmap_carries_the_policy(rendered: Rendered) -> None:
    cm = rendered.get("ConfigMap", "apiproxy-policy", NAMESPACE)
    assert cm["data"]["policy.yaml"] == (REPO / "policies" / "istio-remote.yaml").read_text()


def test_proxy_rbac_is_what_the_policy_generates() -> None:
    """deploy/base/api-proxy-rbac.yaml is `apiproxy policy rbac`'s output for the shipped policy."""
    proc = subprocess.run(
        [sys.executable, "-m", "apiproxy", "policy", "rbac", "policies/istio-remote.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, f"apiproxy policy rbac failed:\n{proc.stderr}"
    generated = [d for d in yaml.safe_load_all(proc.stdout) if d]
    shipped = [d for d in yaml.safe_load_all((BASE / "api-proxy-rbac.yaml").read_text()) if d]
    first = generated[0]
    assert (first["kind"], first["metadata"]["name"]) == ("ClusterRole", "apiproxy:upstream")
    assert shipped == generated, (
        "deploy/base/api-proxy-rbac.yaml drifted from the policy; regenerate it: .venv/bin/"
        "apiproxy policy rbac policies/istio-remote.yaml > deploy/base/api-proxy-rbac.yaml"
    )


# --- pod security --------------------------------------------------------------------------------


def all_containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_container_is_restricted(rendered: Rendered) -> None:
    workloads = list(pod_templates(rendered))
    assert len(workloads) == 2
    for workload, spec in workloads:
        where = f"{rendered.name}: {workload['metadata']['name']}"
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("hostNetwork", False) is False, where
        assert spec.get("hostPID", False) is False, where
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert isinstance(sc["runAsUser"], int), where
            assert sc["runAsUser"] >= 10000, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][key]), f"{where}: {key}"


def test_namespace_enforces_restricted_pod_security(rendered: Rendered) -> None:
    ns = rendered.get("Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_writable_paths_are_volumes(rendered: Rendered) -> None:
    """Read-only root: /tmp is the only writable place, a size-limited emptyDir."""
    for workload, spec in pod_templates(rendered):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            tmp = volumes[mounts["/tmp"]["name"]]
            assert tmp["emptyDir"]["sizeLimit"], workload["metadata"]["name"]
            for path, m in mounts.items():
                if path != "/tmp":
                    assert m.get("readOnly") is True, f"{path} of {workload['metadata']['name']}"
                assert "subPath" not in m, "subPath mounts never see Secret/ConfigMap updates"


def test_token_is_a_deliberate_short_lived_projection(rendered: Rendered) -> None:
    """No legacy automount; the token the components need comes from an explicit projection."""
    for sa in rendered.of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False, sa["metadata"]["name"]
    for workload, spec in pod_templates(rendered):
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(
            m
            for m in spec["containers"][0]["volumeMounts"]
            if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
        )
        sources = volumes[mount["name"]]["projected"]["sources"]
        token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
        assert token["path"] == "token"
        assert token["expirationSeconds"] <= 3600, workload["metadata"]["name"]
        assert "audience" not in token, "the kube-apiserver must accept it"
        assert any(s.get("configMap", {}).get("name") == "kube-root-ca.crt" for s in sources)


# --- the api-proxy -------------------------------------------------------------------------------


def container(r: Rendered, deployment: str) -> Doc:
    containers: list[Doc] = r.get("Deployment", deployment, NAMESPACE)["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def volume_for(r: Rendered, deployment: str, mount_path: str) -> Doc:
    spec = r.get("Deployment", deployment, NAMESPACE)["spec"]["template"]["spec"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == mount_path)
    volume: Doc = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return volume


def test_proxy_runs_the_pinned_command_line(rendered: Rendered) -> None:
    c = container(rendered, "api-proxy")
    assert c["args"] == PROXY_ARGS
    assert "command" not in c, "the image's ENTRYPOINT is `apiproxy`"
    env = {e["name"]: e for e in c["env"]}
    ref = env["CLUSTER_UUID"]["valueFrom"]["configMapKeyRef"]
    assert ref["name"].startswith("apiproxy-cluster")
    assert ref["key"] == "clusterUUID"
    assert ref.get("optional", False) is False, "fail closed without a cluster UUID"


def test_proxy_mounts_the_shared_objects(rendered: Rendered) -> None:
    assert volume_for(rendered, "api-proxy", "/etc/apiproxy/tls")["secret"]["secretName"] == (
        "apiproxy-tls"
    )
    assert volume_for(rendered, "api-proxy", "/etc/apiproxy/peers")["secret"]["secretName"] == (
        "apiproxy-peers"
    )
    assert volume_for(rendered, "api-proxy", "/etc/apiproxy/policy")["configMap"]["name"] == (
        "apiproxy-policy"
    )


def test_proxy_is_highly_available(rendered: Rendered) -> None:
    for name, component in (("api-proxy", "api-proxy"), ("apiproxy-federation", "federation")):
        d = rendered.get("Deployment", name, NAMESPACE)
        assert d["spec"]["replicas"] == 2
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["app.kubernetes.io/component"] == component
        pdb = rendered.get("PodDisruptionBudget", name, NAMESPACE)
        assert pdb["spec"]["minAvailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        anti = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize(
    ("deployment", "port", "readiness"),
    [
        ("api-proxy", 9090, {"path": "/readyz", "port": "metrics"}),
        # ready = identity, exporter serving, kube API answering, leader or healthy standby
        ("apiproxy-federation", 9091, {"path": "/readyz", "port": "metrics"}),
    ],
)
def test_probes_use_the_health_endpoints(
    rendered: Rendered, deployment: str, port: int, readiness: Doc
) -> None:
    c = container(rendered, deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == readiness


def test_services_route_to_the_right_ports(rendered: Rendered) -> None:
    for svc_name, deployment, port_name, port in (
        ("api-proxy", "api-proxy", "https", 4443),
        ("apiproxy-federation", "apiproxy-federation", "exporter", 8443),
    ):
        svc = rendered.get("Service", svc_name, NAMESPACE)
        d = rendered.get("Deployment", deployment, NAMESPACE)
        assert (
            svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        )
        (svc_port,) = svc["spec"]["ports"]  # metrics ports are never published
        assert (svc_port["port"], svc_port["targetPort"]) == (port, port_name)
        ports = {p["name"]: p["containerPort"] for p in container(rendered, deployment)["ports"]}
        assert ports[port_name] == port


def test_federation_runs_the_pinned_command_line(rendered: Rendered) -> None:
    c = container(rendered, "apiproxy-federation")
    assert c["args"] == FEDERATION_ARGS
    env = {e["name"]: e for e in c["env"]}
    assert env["API_HOST"]["valueFrom"]["configMapKeyRef"]["key"] == "apiHost"
    assert rendered.get("Deployment", "apiproxy-federation", NAMESPACE)["spec"]["template"]["spec"][
        "serviceAccountName"
    ] == ("apiproxy-federation")


def test_federation_lease_ships_with_the_manifests(rendered: Rendered) -> None:
    """The Lease is part of the install, so the controller's Role needs no `create` on leases."""
    from apiproxy.federation.main import LEASE_NAME

    lease = rendered.get("Lease", LEASE_NAME, NAMESPACE)
    assert lease["apiVersion"] == "coordination.k8s.io/v1"
    assert "holderIdentity" not in (lease.get("spec") or {})  # the controller owns the spec


def test_overlay_supplies_the_cluster_configmap(installable: Rendered) -> None:
    """Both env references resolve to a ConfigMap the overlay renders, with both keys set."""
    for deployment, var in (("api-proxy", "CLUSTER_UUID"), ("apiproxy-federation", "API_HOST")):
        env = {e["name"]: e for e in container(installable, deployment)["env"]}
        ref = env[var]["valueFrom"]["configMapKeyRef"]
        cm = installable.get("ConfigMap", ref["name"], NAMESPACE)
        assert cm["data"][ref["key"]].strip()


def test_every_namespaced_object_names_its_namespace(rendered: Rendered) -> None:
    for d in rendered.docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] in CLUSTER_SCOPED:
            assert ns is None, d["metadata"]["name"]
        elif d["kind"] in ("Role", "RoleBinding"):
            assert ns in (NAMESPACE, ISTIO_NAMESPACE, "default"), d["metadata"]["name"]
        else:
            assert ns == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


# --- RBAC ----------------------------------------------------------------------------------------


def rules_bound_to(r: Rendered, sa: str) -> list[tuple[str | None, Doc]]:
    """(namespace or None for cluster-wide, rule) for every rule bound to ServiceAccount `sa`."""
    out: list[tuple[str | None, Doc]] = []
    for binding in [*r.of_kind("ClusterRoleBinding"), *r.of_kind("RoleBinding")]:
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
            for s in binding["subjects"]
        ):
            continue
        ns = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = r.get(ref["kind"], ref["name"], ns if ref["kind"] == "Role" else None)
        out += [(ns, rule) for rule in role["rules"]]
    return out


def test_no_wildcards_in_rbac(rendered: Rendered) -> None:
    for role in [*rendered.of_kind("ClusterRole"), *rendered.of_kind("Role")]:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {field}"
            assert not any("*" in res for res in rule.get("resources", []))
            assert "nonResourceURLs" not in rule or "*" not in rule["nonResourceURLs"]


def test_proxy_identity_is_read_only_and_has_no_secrets(rendered: Rendered) -> None:
    rules = rules_bound_to(rendered, "api-proxy")
    assert rules, "the proxy's ServiceAccount is bound to nothing"
    assert any(ns is None for ns, _ in rules), "ClusterRole apiproxy:upstream is not bound"
    for _, rule in rules:
        assert "secrets" not in rule.get("resources", []), rule
        # reads only, plus the two reviews istiod may need for its remote's proxies
        if set(rule.get("resources", [])) <= {"tokenreviews", "subjectaccessreviews"}:
            assert set(rule["verbs"]) <= {"create", "get", "list", "watch"}, rule
        else:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    bound = {
        b["roleRef"]["name"]
        for b in rendered.of_kind("ClusterRoleBinding")
        if any(s["name"] == "api-proxy" for s in b["subjects"])
    }
    assert bound == {"apiproxy:upstream"}


def test_resource_names_are_never_paired_with_verbs_they_cannot_restrict(
    rendered: Rendered,
) -> None:
    """RBAC cannot check resourceNames on create or deletecollection (the name is not known when
    authorizing), so such a rule would read narrower than it is. (list/watch with resourceNames is
    fine: it allows only requests with a matching metadata.name field selector.)"""
    for role in [*rendered.of_kind("ClusterRole"), *rendered.of_kind("Role")]:
        for rule in role["rules"]:
            if rule.get("resourceNames"):
                assert not {"create", "deletecollection"} & set(rule["verbs"]), (
                    role["metadata"]["name"],
                    rule,
                )


def grants(rules: list[tuple[str | None, Doc]], ns: str | None, group: str, res: str) -> Doc:
    """verb -> sorted resourceNames, or None for any name, granted on group/res in `ns`."""
    out: Doc = {}
    for rule_ns, rule in rules:
        if rule_ns != ns or res not in rule["resources"] or group not in rule["apiGroups"]:
            continue
        names = rule.get("resourceNames")
        for verb in rule["verbs"]:
            prev = out.get(verb, [])
            out[verb] = None if names is None or prev is None else sorted({*prev, *names})
    return out


ANY = None  # any object name
FEDERATION_GRANTS: dict[tuple[str | None, str, str], Doc] = {
    # cluster-wide (ClusterRole): only cluster-scoped objects
    (None, "", "namespaces"): {"get": ["kube-system"]},
    (None, "deckhouse.io", "istiomulticlusters"): dict.fromkeys(
        ("get", "list", "watch", "patch"), ANY
    ),
    (None, "deckhouse.io", "istiomulticlusters/status"): {"patch": ANY},
    (None, "", "nodes"): {"get": ANY},
    (None, "", "secrets"): {},
    (None, "", "configmaps"): {},
    (None, "", "pods"): {},
    (None, "", "services"): {},
    # its own namespace
    (NAMESPACE, "", "secrets"): {
        "create": ANY,  # RBAC cannot restrict create by name
        "get": ["apiproxy-client-ca", "apiproxy-identity", "apiproxy-peers"],
        "update": ["apiproxy-peers"],
    },
    (NAMESPACE, "coordination.k8s.io", "leases"): {
        "get": ["apiproxy-federation"],
        "update": ["apiproxy-federation"],
    },
    (NAMESPACE, "", "events"): {},
    (NAMESPACE, "", "configmaps"): {},
    # the Istio namespace
    (ISTIO_NAMESPACE, "", "secrets"): dict.fromkeys(
        ("create", "get", "list", "update", "delete"), ANY
    ),
    (ISTIO_NAMESPACE, "", "configmaps"): {
        "get": ["istio", "istio-ca-root-cert"],
        "update": ["istio"],
    },
    (ISTIO_NAMESPACE, "", "services"): {"get": ANY, "list": ANY},
    (ISTIO_NAMESPACE, "", "pods"): {"list": ANY},
    (ISTIO_NAMESPACE, "", "events"): {},
    # events of the cluster-scoped IstioMulticluster objects
    ("default", "", "events"): {"create": ANY},
    ("default", "", "secrets"): {},
}


def test_federation_privileges_are_exactly_the_reviewed_ones(rendered: Rendered) -> None:
    rules = rules_bound_to(rendered, "apiproxy-federation")
    for (ns, group, res), verbs in FEDERATION_GRANTS.items():
        assert grants(rules, ns, group, res) == verbs, f"{ns or 'cluster-wide'} {group}/{res}"
    reviewed = {(ns, res) for ns, _, res in FEDERATION_GRANTS}
    for ns, rule in rules:
        for res in rule["resources"]:
            assert (ns, res) in reviewed, f"unreviewed grant: {ns or 'cluster-wide'} {res}"
        assert set(rule["apiGroups"]) <= {
            "",
            "deckhouse.io",
            "coordination.k8s.io",
            "events.k8s.io",
        }
