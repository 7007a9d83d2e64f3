"""Command-line plumbing the subcommands share: flags that also read `APIPROXY_*` variables,
HOST:PORT values, and argparse errors as one-line UserErrors instead of usage dumps."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from apiproxy.errors import UserError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


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


def host_port(value: str, flag: str, *, default_host: str | None = None) -> tuple[str, int]:
    """Parse HOST:PORT (`[::1]:443` too). An empty host takes `default_host`, if one is given."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or (default_host or "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{flag}: {value!r} must be HOST:PORT")
    return host, int(port)
