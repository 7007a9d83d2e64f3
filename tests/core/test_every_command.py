"""Every subcommand parses through `flags.Parser`: an unknown flag and a bad value each give
exactly one line on stderr and exit code 2, never a usage dump or a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apiproxy import cli

POLICY = str(Path(__file__).parents[2] / "policies" / "istio-remote.yaml")

# (subcommand words and required arguments, a bad value for one of its options, what the
# line must say)
COMMANDS = [
    (["serve"], ["--max-body-bytes", "lots"], "--max-body-bytes: 'lots' is not a number"),
    (["federate"], ["--credential-ttl", "soon"], "--credential-ttl: invalid duration 'soon'"),
    (["policy", "check", POLICY], ["/nonexistent/policy.yaml"], "/nonexistent/policy.yaml"),
    (["policy", "explain"], ["--policy", "/nonexistent.yaml"], "--policy: /nonexistent.yaml"),
    (
        ["policy", "rbac", POLICY],
        ["--service-account", "nope"],
        "--service-account: 'nope' must be NAMESPACE/NAME",
    ),
    (["audit", "summarize", "-"], ["--top", "-1"], "--top: must be at least 0"),
    (["audit", "suggest", "-"], ["--since", "soon"], "--since: cannot read time 'soon'"),
    (["audit", "report", "-", "--html", "r.html"], ["--top", "x"], "--top: 'x' is not a number"),
    (["sim"], ["--pods", "many"], "--pods: 'many' is not a number"),
    (["demo"], ["--timeout", "forever"], "--timeout: invalid duration 'forever'"),
]
IDS = [" ".join(words[:2]).replace(POLICY, "FILE") for words, _, _ in COMMANDS]


def test_the_table_covers_every_command():
    assert {words[0] for words, _, _ in COMMANDS} == set(cli.COMMANDS)


def _one_line(capsys: pytest.CaptureFixture[str], words: list[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"apiproxy {words[0]}"), lines[0]
    assert "Traceback" not in captured.err
    assert "usage:" not in captured.err
    return lines[0]


@pytest.mark.parametrize(("words", "bad", "message"), COMMANDS, ids=IDS)
def test_an_unknown_flag_is_one_line_and_exit_2(
    words: list[str], bad: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*words, "--bogus-flag"]) == 2
    assert "unrecognized arguments: --bogus-flag" in _one_line(capsys, words)


@pytest.mark.parametrize(("words", "bad", "message"), COMMANDS, ids=IDS)
def test_a_bad_value_is_one_line_and_exit_2(
    words: list[str],
    bad: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # noqa: SIM115 - closed by pytest
    assert cli.main([*words, *bad]) == 2
    assert message in _one_line(capsys, words)


def test_the_console_script_says_the_same_in_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "apiproxy", "federate", "--bogus-flag"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "apiproxy federate: error: unrecognized arguments: --bogus-flag (see --help)"
    ]
