"""scripts/image's decisions, with docker, podman, runc and mmdebstrap replaced by recording
stand-ins on PATH: which engine, which base (and that it says so), the podman settings, the
announced --host-ca mounts, and no build when an image of the same sources exists. The real build
and run are tests/deploy/test_image_run.py's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "scripts" / "image"

# One fake serves as docker and podman: it records its arguments, pulls or not (PULL_OK), keeps
# the imported/built images as files in $STATE, and answers the label and id queries from them.
ENGINE = r"""#!/bin/sh
echo "$(basename "$0") $*" >> "$STATE/calls"
while [ "${1#--}" != "$1" ]; do shift; [ "$1" = runc ] && shift; done  # --runtime runc
case "$1" in
  info) [ "${DOCKER_UP:-0}" = 1 ] ;;
  pull) [ "${PULL_OK:-0}" = 1 ] && touch "$STATE/official" && exit 0
        echo "Error: pinging container registry registry-1.docker.io: no such host" >&2; exit 125 ;;
  import) touch "$STATE/standin" ;;
  build)
    for a in "$@"; do
      case "$a" in localhost/*) touch "$STATE/img_$(echo "$a" | tr -c 'a-zA-Z0-9\n' _)" ;; esac
    done ;;
  image)
    case "$*" in
      *io.apiproxy.base*)
        [ -e "$STATE/standin" ] && ! [ -e "$STATE/official" ] && echo debian-standin; exit 0 ;;
      *'{{.Id}}'*) [ -e "$STATE/official" ] && echo sha256:official || echo sha256:standin ;;
      *localhost/apiproxy*) n=$(echo "$3" | tr -c 'a-zA-Z0-9\n' _); [ -e "$STATE/img_$n" ] ;;
    esac ;;
esac
"""


def stand_ins(tmp_path: Path, *, runc: bool = True) -> tuple[dict[str, str], Path]:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name in ("docker", "podman"):
        (bin_dir / name).write_text(ENGINE)
    (bin_dir / "mmdebstrap").write_text(
        '#!/bin/sh\necho "mmdebstrap $*" >> "$STATE/calls"\nfor a; do last=$a; done\n: > "$last"\n'
    )
    if runc:
        (bin_dir / "runc").write_text("#!/bin/sh\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    # Only the stand-ins and the basic tools: no real engine may be reached from here.
    path = f"{bin_dir}:/usr/bin:/bin"
    env = {
        "PATH": path,
        "STATE": str(state),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    }
    return env, state


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def calls(state: Path, verb: str) -> list[str]:
    lines = (state / "calls").read_text().splitlines()
    return [c for c in lines if f" {verb} " in f" {c} " or c.startswith(f"{verb} ")]


def test_no_registry_podman_builds_on_the_debian_stand_in_and_says_so(tmp_path: Path) -> None:
    env, state = stand_ins(tmp_path)
    proc = run(env)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    assert name.startswith("localhost/apiproxy:0.1.0-"), proc.stdout
    assert "DEBIAN STAND-IN" in proc.stderr
    assert "no such host" in proc.stderr  # why the official base was not used
    (debootstrap,) = calls(state, "mmdebstrap")
    assert "--variant=minbase" in debootstrap
    assert "python3.11" in debootstrap
    assert "bookworm" in debootstrap
    (imported,) = calls(state, "import")
    assert "io.apiproxy.base=debian-standin" in imported
    assert imported.endswith("docker.io/library/python:3.11.13-slim-bookworm")
    (build,) = calls(state, "build")
    assert build.startswith("podman --runtime runc build ")
    for flag in (
        "--network=host",
        "--ulimit nofile=4096:4096",
        "--ulimit nproc=4096:4096",
        "--pull=never",
        "--label io.apiproxy.base=standin",
        f"--tag {name}",
    ):
        assert flag in build, flag
    assert "--volume" not in build, "host files mounted without --host-ca"


def test_sources_unchanged_reuse_the_image_and_the_stand_in(tmp_path: Path) -> None:
    env, state = stand_ins(tmp_path)
    first = run(env)
    assert first.returncode == 0, first.stderr
    (state / "calls").unlink()
    again = run(env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    assert "up to date" in again.stderr
    assert not calls(state, "build")
    assert not calls(state, "mmdebstrap"), "the stand-in is built once"
    (state / "calls").unlink()
    rebuilt = run(env, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert len(calls(state, "build")) == 1


def test_a_reachable_registry_gives_the_official_base_and_another_name(tmp_path: Path) -> None:
    env, state = stand_ins(tmp_path)
    standin = run(env)
    assert standin.returncode == 0, standin.stderr
    official = run({**env, "PULL_OK": "1"})
    assert official.returncode == 0, official.stderr
    assert "base: OFFICIAL" in official.stderr
    assert "STAND-IN" not in official.stderr
    assert "--label io.apiproxy.base=official" in calls(state, "build")[-1]
    # The base is part of the key: the official base never reuses the stand-in's image.
    assert official.stdout.split()[-1] != standin.stdout.split()[-1]


def test_docker_where_its_daemon_answers(tmp_path: Path) -> None:
    env, state = stand_ins(tmp_path)
    proc = run({**env, "DOCKER_UP": "1", "PULL_OK": "1"})
    assert proc.returncode == 0, proc.stderr
    (build,) = calls(state, "build")
    assert build.startswith("docker build ")
    assert "--ulimit" not in build
    assert "--pull" not in build  # docker build's --pull is a boolean: never pass podman's form
    assert not [c for c in calls(state, "build") if c.startswith("podman")]


def test_host_ca_mounts_are_announced_and_read_only(tmp_path: Path) -> None:
    env, state = stand_ins(tmp_path)
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    proc = run({**env, "PIP_CONFIG_FILE": str(pip_conf)}, "--host-ca")
    assert proc.returncode == 0, proc.stderr
    (build,) = calls(state, "build")
    assert "--volume /etc/ssl/certs:/etc/ssl/certs:ro" in build
    assert f"--volume {pip_conf}:/etc/pip.conf:ro" in build
    assert "/etc/ssl/certs (the CA bundle" in proc.stderr
    assert f"{pip_conf} -> /etc/pip.conf" in proc.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--host-ca"]], ids=["unknown", "host-ca-docker"])
def test_refusals_are_one_clear_line(tmp_path: Path, args: list[str]) -> None:
    env, _ = stand_ins(tmp_path)
    proc = run({**env, "APIPROXY_ENGINE": "docker", "PULL_OK": "1"}, *args)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("scripts/image:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stdout == ""
