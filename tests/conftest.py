"""Fixtures shared by every area of the suite. Area-specific fixtures live in tests/<area>/."""

from __future__ import annotations

from pathlib import Path

import pytest

from apiproxy import pki


@pytest.fixture(scope="session")
def test_ca() -> pki.KeyPair:
    return pki.make_ca("apiproxy test CA")


@pytest.fixture(scope="session")
def loopback_server_cert(test_ca: pki.KeyPair) -> pki.KeyPair:
    return pki.server_cert_for_loopback(test_ca)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _logging_at_info() -> None:
    """Every test starts from the same logging set-up: some tests configure it themselves (the
    demo's warning level, JSON), and tests that read logs must not depend on which ran before."""
    from apiproxy import log

    log.configure("json", "info")
