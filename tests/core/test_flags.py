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


def _parser(env: bool) -> flags.Parser:
    p = flags.Parser(prog="apiproxy x", env=env)
    p.option("--listen", "where", default="127.0.0.1:1", type=flags.host_port)
    p.option("--count", "how many", default="3", type=flags.number())
    p.option("--every", "how often", default="1m", type=flags.duration(minimum=1))
    p.option("--gateway", "ADDR:PORT", repeatable=True, type=flags.host_port)
    p.option("--name", "a name", required=True)
    p.switch("--elect", "elect", default=True)
    return p


def test_option_types_convert_command_line_values_and_defaults():
    ns = _parser(env=False).parse_args(["--name", "a", "--count", "7", "--every", "1h30m"])
    assert (ns.listen, ns.count, ns.every, ns.gateway, ns.elect) == (
        ("127.0.0.1", 1),
        7,
        5400.0,
        [],
        True,
    )


def test_environment_values_go_through_the_same_type(monkeypatch):
    monkeypatch.setenv("APIPROXY_COUNT", "abc")
    with pytest.raises(UserError, match=r"^--count: 'abc' is not a number$"):
        _parser(env=True).parse_args(["--name", "a"])
    monkeypatch.setenv("APIPROXY_COUNT", "0")
    with pytest.raises(UserError, match=r"^--count: must be at least 1$"):
        _parser(env=True).parse_args(["--name", "a"])


def test_environment_is_read_only_by_parsers_that_ask_for_it(monkeypatch):
    monkeypatch.setenv("APIPROXY_COUNT", "9")
    monkeypatch.setenv("APIPROXY_NAME", "from-env")
    monkeypatch.setenv("APIPROXY_ELECT", "false")
    ns = _parser(env=True).parse_args([])
    assert (ns.count, ns.name, ns.elect) == (9, "from-env", False)
    with pytest.raises(UserError, match=r"^--name is required$"):
        _parser(env=False).parse_args([])
    assert _parser(env=False).parse_args(["--name", "a"]).count == 3


def test_required_names_the_variable_when_the_environment_counts():
    with pytest.raises(UserError, match=r"^--name is required \(or set APIPROXY_NAME\)$"):
        _parser(env=True).parse_args([])


def test_repeatable_from_the_command_line_replaces_the_environment(monkeypatch):
    monkeypatch.setenv("APIPROXY_GATEWAY", "192.0.2.1:1, 192.0.2.2:2")
    assert _parser(env=True).parse_args(["--name", "a"]).gateway == [
        ("192.0.2.1", 1),
        ("192.0.2.2", 2),
    ]
    ns = _parser(env=True).parse_args(["--name", "a", "--gateway", "192.0.2.3:3"])
    assert ns.gateway == [("192.0.2.3", 3)]
    monkeypatch.setenv("APIPROXY_GATEWAY", "nope")
    with pytest.raises(UserError, match=r"^--gateway: 'nope' must be HOST:PORT$"):
        _parser(env=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90", 90.0), ("1.5", 1.5), ("24h", 86400.0), ("1h30m", 5400.0), ("500ms", 0.5)],
)
def test_duration(value, seconds):
    assert flags.parse_duration(value, "--every") == seconds


@pytest.mark.parametrize("value", ["", "soon", "5x", "1h 30m", "m5", "nan", "inf", "-"])
def test_duration_refuses(value):
    with pytest.raises(UserError, match=r"^--every: invalid duration"):
        flags.parse_duration(value, "--every")


def test_number_refuses_nan_and_values_below_the_minimum():
    with pytest.raises(UserError, match="must be at least 0"):
        flags.number(float, minimum=0)("nan", "--x")
    with pytest.raises(UserError, match=r"must be at least 0\.05"):
        flags.number(float, minimum=0.05)("0.01", "--x")
    assert flags.number(float, minimum=0.05)("0.05", "--x") == 0.05


def test_path_and_choice(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("x")
    assert flags.path()(str(f), "--policy") == f
    with pytest.raises(UserError, match=r"^--policy: .*missing: no such file$"):
        flags.path()(str(tmp_path / "missing"), "--policy")
    assert flags.path(must_exist=False)(str(tmp_path / "new"), "--out") == tmp_path / "new"
    assert flags.log_level("INFO", "--log-level") == "info"
    with pytest.raises(UserError, match=r"^--log-level: 'loud' must be one of debug, info"):
        flags.log_level("loud", "--log-level")
