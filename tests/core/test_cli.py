import subprocess
import sys

from apiproxy.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name}" in out


def test_unknown_command_is_one_line_error_and_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apiproxy: error: unknown command 'frobnicate'")


def test_console_script_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "apiproxy", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("apiproxy ")
