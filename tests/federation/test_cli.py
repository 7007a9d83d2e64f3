"""`apiproxy federate` flags: env vars, validation, one-line user errors."""

from __future__ import annotations

import pytest

from apiproxy import cli
from apiproxy.errors import UserError
from apiproxy.federation import main as fmain


def _args(*extra: str) -> list[str]:
    return ["--cluster-domain", "cluster.local", "--api-host", "proxy.example.com:4443", *extra]


def test_flags_and_defaults():
    cfg = fmain.config_from_args(
        fmain._parser("apiproxy federate").parse_args(
            _args(
                "--credential-ttl",
                "1h30m",
                "--ingress-gateway",
                "203.0.113.1:15443",
                "--ingress-gateway",
                "gw.example.com:443",
                "--no-leader-elect",
            )
        )
    )
    cfg.validate()
    assert cfg.credential_ttl == 5400
    assert cfg.resync_interval == 60
    assert cfg.shutdown_timeout == 5
    assert cfg.namespace == "apiproxy-system"
    assert cfg.istio_namespace == "istio-system"
    assert cfg.exporter_listen == "0.0.0.0:8443"
    assert cfg.ingress_gateways == ["203.0.113.1:15443", "gw.example.com:443"]
    assert cfg.leader_elect is False


def test_every_flag_reads_an_apiproxy_env_var(monkeypatch):
    monkeypatch.setenv("APIPROXY_CLUSTER_DOMAIN", "corp.local")
    monkeypatch.setenv("APIPROXY_API_HOST", "api.corp:4443")
    monkeypatch.setenv("APIPROXY_RESYNC_INTERVAL", "30s")
    monkeypatch.setenv("APIPROXY_INGRESS_GATEWAY", "198.51.100.1:15443,198.51.100.2:15443")
    monkeypatch.setenv("APIPROXY_LEADER_ELECT", "false")
    monkeypatch.setenv("APIPROXY_SHUTDOWN_TIMEOUT", "20s")
    cfg = fmain.config_from_args(fmain._parser("x").parse_args([]))
    assert cfg.shutdown_timeout == 20
    assert (cfg.cluster_domain, cfg.api_host, cfg.resync_interval) == (
        "corp.local",
        "api.corp:4443",
        30,
    )
    assert len(cfg.ingress_gateways) == 2
    assert cfg.leader_elect is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--credential-ttl", "soon"], "invalid duration"),
        (["--api-host", "https://x/"], "--api-host"),
        (["--exporter-tls-cert", "/c"], "go together"),
        (["--ingress-gateway", "nope"], "ADDR:PORT"),
        (["--ingress-gateway-service", "a/b", "--ingress-gateway", "1.2.3.4:1"], "not both"),
        (
            ["--kubeconfig", "/nonexistent/kubeconfig"],
            "--kubeconfig: /nonexistent/kubeconfig: no such file",
        ),
        (["--log-level", "loud"], "--log-level: .loud. must be one of"),
        (["--shutdown-timeout", "0s"], "--shutdown-timeout"),
        (["--shutdown-timeout", "later"], "--shutdown-timeout: invalid duration"),
    ],
)
def test_user_errors_are_one_clean_line(extra, message, capsys):
    with pytest.raises(UserError, match=message):
        fmain.main(_args(*extra), prog="apiproxy federate")
    assert cli.main(["federate", *_args(*extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("apiproxy federate: error:")
    assert "Traceback" not in err[0]


def test_crd_is_shipped_as_package_data():
    crd = fmain.load_crd()
    assert crd["metadata"]["name"] == "istiomulticlusters.deckhouse.io"
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["scope"] == "Cluster"
    assert version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["enableIngressGateway"]["default"] is True
    assert spec["required"] == ["metadataEndpoint"]
