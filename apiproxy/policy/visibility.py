"""Which namespaces a rule lets a peer see, and which projection its objects get.

A rule whose `namespaces` is a mapping (`names` and/or a Kubernetes label `selector`) allows
cluster-wide reads of its resources and the proxy filters the answers to the visible namespaces
(apiproxy/filtering.py). Selectors follow `metav1.LabelSelector` exactly: `matchLabels` and
`matchExpressions` (In, NotIn, Exists, DoesNotExist) are ANDed; `NotIn` and `DoesNotExist` match a
namespace without the key. A namespace the proxy has no labels for is not visible through the
selector (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OPERATORS",
    "PROJECTIONS",
    "LabelSelector",
    "Requirement",
    "Visibility",
]

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# Projection name → (API group, resource) it applies to. The transforms: apiproxy/projection.py.
PROJECTIONS: dict[str, tuple[str, str]] = {
    "istiod-pod": ("", "pods"),
    "istiod-node": ("", "nodes"),
}


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        return False  # unknown operators never match (the loader refuses them)


@dataclass(frozen=True, slots=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [
                {"key": r.key, "operator": r.operator}
                | ({"values": sorted(r.values)} if r.values else {})
                for r in self.match_expressions
            ]
        return out


@dataclass(frozen=True, slots=True)
class Visibility:
    """The namespaces a rule's objects may come from: listed by name, or labelled to match."""

    names: frozenset[str] = frozenset()
    selector: LabelSelector | None = None

    def sees(self, namespace: str, labels: Mapping[str, str] | None) -> bool:
        """`labels` None: the proxy does not know the namespace (not visible by selector)."""
        if namespace in self.names:
            return True
        return self.selector is not None and labels is not None and self.selector.matches(labels)

    @property
    def needs_labels(self) -> bool:
        return self.selector is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.names:
            out["names"] = sorted(self.names)
        if self.selector is not None:
            out["selector"] = self.selector.to_dict()
        return out
