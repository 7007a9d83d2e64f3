import json

import structlog

from apiproxy import log


def test_secrets_are_redacted_in_json_logs(capsys):
    log.configure("json")
    logger = structlog.get_logger("t")
    logger.info(
        "upstream refused",
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
    assert record["event"] == "upstream refused"


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
    structlog.get_logger("t").info("after swap")
    logging.getLogger("aiohttp.test").warning("stdlib after swap")
    out = second.getvalue()
    assert '"event": "after swap"' in out
    assert "stdlib after swap" in out
