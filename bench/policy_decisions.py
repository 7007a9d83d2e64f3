"""Policy decision latency: median microseconds per Policy.decide for 10 and 1,000 rules.

Run: python bench/policy_decisions.py            (about half a minute)
     python bench/policy_decisions.py --quick    (a seconds-long smoke run)
Requests are classified once up front; the figure is the decision alone (classification is
reported separately). Half of the requests match some rule, half do not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from apiproxy.policy import Policy, Rule
from apiproxy.request import classify

GROUPS = ["", "apps", "discovery.k8s.io", "networking.istio.io", "gateway.networking.k8s.io"]
VERBS = ["get", "list", "watch"]


def make_rules(count: int, rng: random.Random) -> tuple[Rule, ...]:
    rules = []
    for i in range(count):
        namespaces = ("*",) if rng.random() < 0.5 else (f"ns{rng.randrange(50)}",)
        peers = ("*",) if rng.random() < 0.3 else (f"peer{rng.randrange(20)}",)
        rules.append(
            Rule(
                name=f"rule-{i}",
                peers=peers,
                verbs=tuple(rng.sample(VERBS, rng.randint(1, 3))),
                api_groups=(rng.choice(GROUPS),),
                resources=(f"res{rng.randrange(max(count // 4, 3))}",),
                namespaces=namespaces,
            )
        )
    return tuple(rules)


def make_targets(rules: tuple[Rule, ...], count: int, rng: random.Random) -> list[str]:
    targets = []
    for _ in range(count):
        rule = rng.choice(rules)
        group = rule.api_groups[0]
        prefix = f"/apis/{group}/v1" if group else "/api/v1"
        ns = rule.namespaces[0] if rule.namespaces != ("*",) else f"ns{rng.randrange(50)}"
        resource = rule.resources[0] if rng.random() < 0.5 else "secrets"
        watch = "?watch=true" if rng.random() < 0.5 else ""
        targets.append(f"{prefix}/namespaces/{ns}/{resource}{watch}")
    return targets


def measure(rule_count: int, requests: int, repeats: int) -> tuple[float, float]:
    rng = random.Random(rule_count)
    policy = Policy(make_rules(rule_count, rng))
    targets = make_targets(policy.rules, requests, rng)
    peers = [f"peer{rng.randrange(25)}" for _ in targets]
    infos = [classify("GET", t) for t in targets]
    pairs = list(zip(peers, infos, strict=True))
    decide = policy.decide
    decision_runs, classify_runs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for peer, info in pairs:
            decide(peer, info)
        decision_runs.append((time.perf_counter() - start) / len(pairs) * 1e6)
        start = time.perf_counter()
        for target in targets:
            classify("GET", target)
        classify_runs.append((time.perf_counter() - start) / len(targets) * 1e6)
    return statistics.median(decision_runs), statistics.median(classify_runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args()
    requests, repeats = (2_000, 5) if args.quick else (20_000, 15)
    for rule_count in (10, 1_000):
        decision_us, classify_us = measure(rule_count, requests, repeats)
        print(
            f"rules={rule_count:>5}  decision median {decision_us:.2f} us  "
            f"(classify {classify_us:.2f} us; {requests} requests x {repeats} repeats)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
