import json

import structlog

from apiproxy import log


def test_secrets_are_redacted_in_json_logs(capsys):
    log.configure("json")
    logger = structlog.get_logger("t")
    logger.info(
        "upstream_refused",
        token="abc.def.ghi",
        detail="header was Bearer s3cr3t-value and eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln",
        nested={"client_key": "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----"},
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["token"] == "[redacted]"
    assert "s3cr3t" not in line
    assert "eyJhbGci" not in line
    assert "BEGIN PRIVATE KEY" not in line
    assert record["event"] == "upstream_refused"


def test_logging_follows_the_current_stderr(monkeypatch):
    """A stream captured at configure() time may be closed later (test runners, daemons)."""
    import io
    import logging

    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    log.configure("json")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    structlog.get_logger("t").info("after_swap")
    logging.getLogger("aiohttp.test").warning("stdlib after swap")
    out = second.getvalue()
    assert '"event": "after_swap"' in out
    assert "stdlib after swap" in out


def _log_calls(root):
    """(file:line, event, field names) of every structlog/logging call under `root`."""
    import ast
    from pathlib import Path

    levels = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
    for path in sorted(Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels
            ):
                continue
            target = node.func.value
            name = getattr(target, "id", None) or getattr(target, "attr", "")
            if "log" not in name.lower():
                continue
            event = node.args[0] if node.args else None
            text = event.value if isinstance(event, ast.Constant) else ast.unparse(event or node)
            yield f"{path}:{node.lineno}", text, [k.arg for k in node.keywords if k.arg]


def test_every_log_event_is_a_snake_case_name_with_fields():
    """The convention (CONTRIBUTING.md): a constant snake_case event name, details as fields."""
    import re
    from pathlib import Path

    import apiproxy
    import apiproxy_dev

    snake = re.compile(r"[a-z][a-z0-9_]*")
    roots = [Path(apiproxy.__file__).parent, Path(apiproxy_dev.__file__).parent]
    calls = [c for root in roots for c in _log_calls(root)]
    assert len(calls) > 50  # the scan finds the package's calls
    bad = [
        (where, event, fields)
        for where, event, fields in calls
        if not snake.fullmatch(event) or not all(snake.fullmatch(f) for f in fields)
    ]
    assert bad == []
