"""bench.harness, the pieces every benchmark stands on: held ports, log records of a child,
`apiproxy serve` on a port it picks, nginx configurations nginx accepts."""

from __future__ import annotations

import errno
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness
from bench.harness import BenchFiles, Child, HeldPort


def test_a_held_port_takes_no_connection_and_no_other_binder() -> None:
    with HeldPort() as held:
        # Nobody without SO_REUSEPORT can take it, and nothing listens there yet.
        with socket.socket() as other, pytest.raises(OSError, match="in use") as taken:
            other.bind(("127.0.0.1", held.port))
        assert taken.value.errno == errno.EADDRINUSE
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", held.port), timeout=5).close()
        # The child it is held for binds it too (nginx: `listen ... reuseport`) and gets them.
        with socket.socket() as child:
            child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            child.bind(("127.0.0.1", held.port))
            child.listen()
            with socket.create_connection(("127.0.0.1", held.port), timeout=5):
                conn, _ = child.accept()
                conn.close()


def test_log_event_reads_only_what_this_child_wrote(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    say = 'import sys; sys.stderr.write(\'{"event": "serving", "listen": "127.0.0.1:%s"}\\n\')'
    first = Child("first", [sys.executable, "-c", say % 1111], None, log)
    assert first.log_event("serving", 30)["listen"] == "127.0.0.1:1111"
    first.wait(30)
    # A restart appends to the same log: the new child's record, not the old one.
    second = Child("second", [sys.executable, "-c", say % 2222], None, log)
    assert second.log_event("serving", 30)["listen"] == "127.0.0.1:2222"
    second.stop()
    quiet = Child("quiet", [sys.executable, "-c", "pass"], None, log)
    with pytest.raises(RuntimeError, match="exited"):
        quiet.log_event("serving", 30)


def test_apiproxy_serve_binds_port_0_and_says_where(tmp_path: Path) -> None:
    files = BenchFiles.write(tmp_path)
    argv = harness.serve_argv(
        files,
        upstream="https://127.0.0.1:1",  # never reached: only its serving record matters here
        upstream_ca=files.ca_file,
        audit_log=tmp_path / "audit.log",
    )
    child = Child("apiproxy", argv, None, tmp_path / "apiproxy.log")
    try:
        url = harness.serving_url(child)
        host, _, port = url.removeprefix("https://").partition(":")
        ctx = ssl.create_default_context(cafile=str(files.ca_file))
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        assert child.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.skipif(harness.nginx_exe() is None, reason="needs nginx (scripts/ensure-tools)")
def test_nginx_accepts_the_configurations(tmp_path: Path) -> None:
    exe = harness.nginx_exe()
    assert exe is not None
    files = BenchFiles.write(tmp_path)
    with HeldPort() as a, HeldPort() as b:
        confs = {
            "proxy": harness.nginx_conf(
                tmp_path,
                "proxy",
                [harness.nginx_server(a, files, "    location / { proxy_pass https://up; }\n")],
                upstreams={"up": "127.0.0.1:1"},
                http=harness.nginx_proxy("t0ken", verify_ca=files.ca_file, tls_upstream=True),
            ),
            # bench.real: HTTPS to an apiserver whose certificate names an IP (not checked).
            "real": harness.nginx_conf(
                tmp_path,
                "real",
                [harness.nginx_server(a, files, "    location / { proxy_pass https://up; }\n")],
                upstreams={"up": "127.0.0.1:1"},
                http=harness.nginx_proxy("t0ken", tls_upstream=True),
            ),
            "static": harness.nginx_conf(
                tmp_path,
                "static",
                [harness.nginx_server(b, files, f"    root {tmp_path};\n")],
                access_log=False,
            ),
        }
        for name, text in confs.items():
            conf = tmp_path / f"{name}.conf"
            conf.write_text(text)
            check = subprocess.run(
                [*harness.nginx_argv(exe, tmp_path, conf), "-t"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert check.returncode == 0, (name, check.stderr)
    assert 'proxy_set_header Authorization "Bearer t0ken";' in confs["proxy"]
    assert "access_log off;" in confs["static"]
    assert "proxy_ssl_verify on;" in confs["proxy"]
    assert "proxy_ssl_verify off;" in confs["real"]
