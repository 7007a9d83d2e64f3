"""Label and field selectors with the kube-apiserver's grammar and its error behaviour."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(
    r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class SelectorError(ValueError):
    """Unparseable or unsupported selector; the server answers 400 BadRequest."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" match objects without the key, as in apimachinery.
        return self.key not in labels or labels[self.key] not in self.values


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


# A label value: empty, or at most 63 alphanumerics with '-', '_', '.' inside.
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_SET = re.compile(r"^\s*(\S+?)\s+(in|notin)\s*\((.*)\)\s*$")
_EQ = re.compile(r"^\s*([^!=\s]+)\s*(==|=|!=)\s*(\S*)\s*$")


def parse_labels(text: str) -> tuple[Requirement, ...]:
    """Parse a label selector (`a=b,c!=d,e in (f,g),!h,i`). Raises SelectorError."""
    reqs: list[Requirement] = []
    if not text.strip():
        return ()
    for part in _split_top(text):
        p = part.strip()
        if not p:
            raise SelectorError("unable to parse requirement: found '', expected: identifier")
        if m := _SET.match(p):
            key, op, vals = m.group(1), m.group(2), m.group(3)
            values = frozenset(v.strip() for v in vals.split(",") if v.strip())
            req = Requirement(key, op, values)
        elif m := _EQ.match(p):
            op = "!=" if m.group(2) == "!=" else "="
            req = Requirement(m.group(1), op, frozenset([m.group(3)]))
        elif p.startswith("!"):
            req = Requirement(p[1:].strip(), "!")
        else:
            req = Requirement(p, "exists")
        if not _NAME.match(req.key):
            raise SelectorError(f"unable to parse requirement: invalid label key {req.key!r}")
        for value in req.values:
            if value and value[0] in "=!(),":
                raise SelectorError(
                    f"unable to parse requirement: found '{value[0]}', expected: identifier"
                )
            if not _VALUE.match(value):
                raise SelectorError(f"unable to parse requirement: invalid label value: {value!r}")
        reqs.append(req)
    return tuple(reqs)


def labels_match(reqs: tuple[Requirement, ...], labels: Mapping[str, str]) -> bool:
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    op: str  # "=" or "!="
    value: str

    def matches(self, fields: Mapping[str, str]) -> bool:
        got = fields.get(self.field, "")
        return (got == self.value) if self.op == "=" else (got != self.value)


def _unescape(value: str) -> str:
    # fields.UnescapeValue: \\ \, \= are the only escapes.
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in "\\,=":
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def parse_fields(text: str) -> tuple[FieldRequirement, ...]:
    """Parse a field selector (`a=b,c!=d`, `==` allowed), as fields.ParseSelector does."""
    if not text.strip():
        return ()
    out: list[FieldRequirement] = []
    for term in re.split(r"(?<!\\),", text):
        for i in range(len(term)):
            op = next((o for o in ("!=", "==", "=") if term.startswith(o, i)), None)
            if op is not None:
                value = _unescape(term[i + len(op) :])
                field = term[:i].strip()
                if field or value:  # `==` alone selects everything, as in the real server
                    out.append(FieldRequirement(field, "!=" if op == "!=" else "=", value))
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
    return tuple(out)


def fields_match(reqs: tuple[FieldRequirement, ...], fields: Mapping[str, str]) -> bool:
    return all(r.matches(fields) for r in reqs)
