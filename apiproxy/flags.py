"""Command-line plumbing every subcommand shares: one way to declare an option, `APIPROXY_*`
environment variables, typed values, and every parse error as one line instead of a usage dump.

```python
p = flags.Parser(prog=prog, description="...", env=True)  # env=True: daemons read APIPROXY_*
p.option("--listen", "HOST:PORT to serve on", default="0.0.0.0:4443", type=flags.host_port)
p.option("--max-body-bytes", "largest body accepted", default="3145728", type=flags.number())
p.option("--resync-interval", "how often peers are re-fetched", default="60s",
         type=flags.duration())
p.option("--policy", "access policy (YAML)", type=flags.path(), required=True)
p.option("--ingress-gateway", "advertise ADDR:PORT", repeatable=True)
p.switch("--leader-elect", "elect a leader", default=True)
ns = p.parse_args(argv)  # ns.listen == ("0.0.0.0", 4443), ns.max_body_bytes == 3145728, ...
```

A type is a function `(value, flag) -> converted` that raises `UserError` naming the flag. It
runs on command-line values and on environment values alike, so both are refused the same way.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from apiproxy.errors import UserError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

Convert = Callable[[str, str], Any]
"""An option type: `(value, flag) -> converted value`; raises `UserError` on a bad value."""


class _Repeat(argparse.Action):
    """Repeatable option: the command line replaces the default (from the environment), it does
    not add to it, so what the operator typed is exactly what is used."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, [*items, values])


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and the `option` / `switch` helpers.

    `env=True` makes every option also read `APIPROXY_<FLAG>` (the commands that run in a pod:
    serve, federate). Operator commands leave it off so a stray variable never changes a report.
    Sub-parsers (`add_subparsers().add_parser`) are `Parser`s too and inherit `env`.
    """

    def __init__(self, *args: Any, env: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env = env
        self._required: list[str] = []

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        env = self.env
        make = action.add_parser

        def add_parser(name: str, **kw: Any) -> Parser:
            sub = make(name, **kw)
            assert isinstance(sub, Parser)
            sub.env = env
            return sub

        action.add_parser = add_parser  # type: ignore[method-assign]
        return action

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")

    def option(
        self,
        flag: str,
        help: str,
        *,
        default: Any = None,
        type: Convert | None = None,
        required: bool = False,
        repeatable: bool = False,
        metavar: str | None = None,
        aliases: Sequence[str] = (),
    ) -> None:
        """Declare `--flag VALUE`. A string default goes through `type` like a typed value;
        with `env`, a non-empty `APIPROXY_<FLAG>` replaces the default (comma-separated when
        `repeatable`). `required` is checked after parsing, naming the variable too."""
        env_value = from_env(flag) if self.env else None
        convert = _bind(type, flag)
        if env_value is not None:
            if repeatable:
                default = [convert(v.strip()) for v in env_value.split(",") if v.strip()]
            else:
                default = env_value
        elif repeatable and default is None:
            default = []
        if required and env_value is None:
            self._required.append(flag)
        shown = ""
        if self.env:
            shown = f"env {env_name(flag)}"
        if default not in (None, [], "") and env_value is None:
            shown += ("; " if shown else "") + f"default {default}"
        if required:
            shown = "required" + (f"; {shown}" if shown else "")
        kw: dict[str, Any] = {"default": default, "help": help + (f" ({shown})" if shown else "")}
        if type is not None:
            kw["type"] = convert
        if repeatable:
            kw["action"] = _Repeat
        if metavar is not None:
            kw["metavar"] = metavar
        self.add_argument(flag, *aliases, **kw)

    def switch(self, flag: str, help: str, *, default: bool = False) -> None:
        """Declare `--flag` / `--no-flag`; with `env`, `APIPROXY_<FLAG>` is true or false."""
        value = env_bool(flag, default) if self.env else default
        shown = f" (env {env_name(flag)})" if self.env else ""
        self.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=value, help=help + shown
        )

    def log_options(self, *, log_format: bool = True) -> None:
        """`--log-level` (and `--log-format`): the same flags wherever a command logs."""
        if log_format:
            self.option(
                "--log-format",
                "auto (JSON unless stderr is a terminal), json or console",
                default="auto",
                type=choice(*LOG_FORMATS),
            )
        self.option("--log-level", "debug, info, warning or error", default="info", type=log_level)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        if rest:  # the caller reports unknown arguments first
            return ns, rest
        for flag in self._required:
            if getattr(ns, flag.lstrip("-").replace("-", "_"), None) in (None, ""):
                hint = f" (or set {env_name(flag)})" if self.env else ""
                raise UserError(f"{flag} is required{hint}")
        return ns, rest


def _bind(convert: Convert | None, flag: str) -> Callable[[str], Any]:
    if convert is None:
        return lambda value: value

    def bound(value: str) -> Any:
        return convert(value, flag)

    bound.__name__ = getattr(convert, "__name__", "value")  # argparse names it in messages
    return bound


LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_name(flag: str) -> str:
    """`--cluster-uuid` → `APIPROXY_CLUSTER_UUID`."""
    return "APIPROXY_" + flag.lstrip("-").upper().replace("-", "_")


def from_env(flag: str) -> str | None:
    """The flag's environment value; an empty variable counts as unset."""
    return os.environ.get(env_name(flag)) or None


def env_bool(flag: str, default: bool) -> bool:
    """A boolean from the environment. An unrecognised value is an error, not `false`: a typo
    must not silently switch off something like leader election."""
    value = from_env(flag)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UserError(f"{env_name(flag)}={value!r} is not a boolean (use true or false)")


# -- types ----------------------------------------------------------------------------------


def host_port(value: str, flag: str, *, default_host: str | None = None) -> tuple[str, int]:
    """Parse HOST:PORT (`[::1]:443` too). An empty host takes `default_host`, if one is given."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or (default_host or "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{flag}: {value!r} must be HOST:PORT")
    return host, int(port)


def listen_address(default_host: str) -> Convert:
    """HOST:PORT where `:PORT` alone means `default_host:PORT`."""

    def listen_address(value: str, flag: str) -> tuple[str, int]:
        return host_port(value, flag, default_host=default_host)

    return listen_address


def number(kind: type[int] | type[float] = int, minimum: float = 1) -> Convert:
    """An int (or float) of at least `minimum`."""

    def number(value: str, flag: str) -> Any:
        try:
            n = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{flag}: {value!r} is not a number") from None
        if n != n or n < minimum:  # NaN compares false with everything
            raise UserError(f"{flag}: must be at least {minimum}")
        return n

    return number


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str, flag: str) -> float:
    """`24h`, `90s`, `1h30m`, `500ms` or plain seconds."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise UserError(
                f"{flag}: invalid duration {text!r} (use e.g. 24h, 90s, 1h30m)"
            ) from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise UserError(f"{flag}: invalid duration {text!r} (use e.g. 24h, 90s, 1h30m)")
    return seconds


def duration(minimum: float = 0.0) -> Convert:
    """A duration (`24h`, `90s`, `1h30m`, `500ms`, plain seconds) of at least `minimum` s."""

    def duration(value: str, flag: str) -> float:
        seconds = parse_duration(value, flag)
        if seconds < minimum:
            raise UserError(f"{flag}: must be at least {minimum:g}s")
        return seconds

    return duration


def path(must_exist: bool = True) -> Convert:
    """A file path; with `must_exist`, refused unless it names an existing file."""

    def path(value: str, flag: str) -> Path:
        if must_exist and not Path(value).is_file():
            raise UserError(f"{flag}: {value}: no such file")
        return Path(value)

    return path


def choice(*allowed: str) -> Convert:
    """One of `allowed` (checked on environment values too, unlike argparse's `choices`)."""

    def choice(value: str, flag: str) -> str:
        if value not in allowed:
            raise UserError(f"{flag}: {value!r} must be one of {', '.join(allowed)}")
        return value

    return choice


def text(pattern: str, what: str) -> Convert:
    """A string matching `pattern` (full match); `what` says the expected form in the error."""
    compiled = re.compile(pattern)

    def text(value: str, flag: str) -> str:
        if not compiled.fullmatch(value):
            raise UserError(f"{flag}: {value!r} must be {what}")
        return value

    return text


def log_level(value: str, flag: str) -> str:
    """A log level, in any case (`INFO` too)."""
    return choice(*LOG_LEVELS)(value.lower(), flag)  # type: ignore[no-any-return]
