import pytest

from apiproxy import flags
from apiproxy.errors import UserError


@pytest.mark.parametrize(
    ("value", "default_host", "expected"),
    [
        ("127.0.0.1:4443", None, ("127.0.0.1", 4443)),
        ("[::1]:8443", None, ("::1", 8443)),
        (":9090", "0.0.0.0", ("0.0.0.0", 9090)),
    ],
)
def test_host_port(value, default_host, expected):
    assert flags.host_port(value, "--listen", default_host=default_host) == expected


@pytest.mark.parametrize("value", ["nope", ":9090", "host:", "host:99999", "host:-1", "host:80a"])
def test_host_port_refuses_with_the_flag_name(value):
    with pytest.raises(UserError, match=r"^--listen: .* must be HOST:PORT$"):
        flags.host_port(value, "--listen")


def test_env_bool_refuses_a_typo_instead_of_reading_false(monkeypatch):
    monkeypatch.setenv("APIPROXY_LEADER_ELECT", "ture")
    with pytest.raises(UserError, match="APIPROXY_LEADER_ELECT='ture' is not a boolean"):
        flags.env_bool("leader-elect", default=True)
    monkeypatch.setenv("APIPROXY_LEADER_ELECT", "false")
    assert flags.env_bool("leader-elect", default=True) is False
    monkeypatch.setenv("APIPROXY_LEADER_ELECT", "")
    assert flags.env_bool("leader-elect", default=True) is True


def test_parser_errors_are_one_line_user_errors():
    parser = flags.Parser(prog="apiproxy x")
    parser.add_argument("--n", type=int)
    with pytest.raises(UserError, match=r"argument --n: invalid int value: 'x' \(see --help\)"):
        parser.parse_args(["--n", "x"])
