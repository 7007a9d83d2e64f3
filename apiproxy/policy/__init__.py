"""The access policy: a default-deny allowlist shaped like Kubernetes RBAC (see docs/policy.md)."""

from __future__ import annotations

from pathlib import Path

from apiproxy.policy.engine import Decision, Engine
from apiproxy.policy.model import PolicyError, Rule, parse_rules, read_policy_text
from apiproxy.request import RequestInfo

__all__ = ["Decision", "Policy", "PolicyError", "Rule"]


class Policy:
    """A validated policy with its compiled decision index. Immutable; reload builds a new one."""

    __slots__ = ("_engine", "rules", "source")

    def __init__(self, rules: tuple[Rule, ...], source: str = "<string>") -> None:
        self.rules = rules
        self.source = source
        self._engine = Engine(rules)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        return cls.from_text(read_policy_text(path), source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<string>") -> Policy:
        return cls(parse_rules(text, source), source)

    def decide(self, peer: str, info: RequestInfo) -> Decision:
        return self._engine.decide(peer, info)

    def __repr__(self) -> str:
        return f"<Policy {self.source} rules={len(self.rules)}>"
