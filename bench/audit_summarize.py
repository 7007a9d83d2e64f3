"""Throughput of `apiproxy audit summarize` (and suggest) on a generated audit log.

    .venv/bin/python bench/audit_summarize.py              # 300k records (~200 MB), a few seconds
    .venv/bin/python bench/audit_summarize.py --records 1500000
    .venv/bin/python bench/audit_summarize.py --quick      # smoke mode (a test runs it)

The log is built with the real `make_event`: a mix of lists, gets, watches (two records each),
policy denials, errors and authentication failures from 5 peers over many namespaces. It prints
records per second, MB per second and the peak resident memory of the process, which must stay
flat as the log grows (summarize keeps per-peer aggregates only).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apiproxy.audit import events as ev
from apiproxy.audit.review import summarize
from apiproxy.audit.suggest import suggest

PEERS = [f"cluster-{c}" for c in "bcdef"]
RESOURCES = [
    ("", "services"),
    ("", "endpoints"),
    ("", "pods"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "configmaps"),
    ("networking.istio.io", "gateways"),
]


def generate(path: Path, records: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    written = 0
    n = 0
    with path.open("w") as f:
        while written < records:
            n += 1
            peer = rng.choice(PEERS)
            group, resource = rng.choice(RESOURCES)
            ns = f"ns-{rng.randrange(200)}"
            roll = rng.random()
            verb = "watch" if roll < 0.1 else "get" if roll < 0.4 else "list"
            denied = rng.random() < 0.05
            unauth = rng.random() < 0.01
            received = t0 + timedelta(seconds=n * 0.01)
            prefix = f"/apis/{group}/v1" if group else "/api/v1"
            uri = f"{prefix}/namespaces/{ns}/{resource}" + (
                "?watch=true" if verb == "watch" else ""
            )
            code = 401 if unauth else 403 if denied else 404 if rng.random() < 0.01 else 200
            notes: dict[str, object] = {
                ev.DECISION: "forbid" if denied or unauth else "allow",
                ev.REASON: "no rule matched" if denied else "allowed by rule 'istio'",
                ev.RULE: None if denied or unauth else "istio",
                ev.BYTES_SENT: rng.randrange(200, 20000),
            }
            if unauth:
                notes[ev.AUTHN_FAILURE] = "client-certificate-untrusted"
            common = {
                "audit_id": f"00000000-0000-4000-8000-{n:012d}",
                "request_uri": uri,
                "verb": verb,
                "username": ev.ANONYMOUS if unauth else ev.peer_username(peer),
                "groups": [ev.PEER_GROUP],
                "extra": {
                    ev.EXTRA_AUTHENTICATED_BY: ["mtls"],
                    ev.EXTRA_CERT_SUBJECT: [f"CN={peer}"],
                },
                "source_ips": ["10.1.2.3"],
                "user_agent": "pilot-discovery/1.24.0",
                "object_ref": ev.object_ref(
                    resource=resource, namespace=ns, api_group=group, api_version="v1"
                ),
                "code": code,
                "received": received,
            }
            if verb == "watch" and code == 200:
                started = ev.make_event(
                    stage=ev.STAGE_RESPONSE_STARTED,
                    stage_time=received,
                    annotations=notes,
                    **common,
                )
                f.write(json.dumps(started, separators=(",", ":")) + "\n")
                written += 1
                notes[ev.WATCH_EVENTS] = rng.randrange(1, 500)
                notes[ev.WATCH_DURATION] = rng.uniform(60, 1800)
            done = ev.make_event(
                stage=ev.STAGE_RESPONSE_COMPLETE,
                stage_time=received + timedelta(milliseconds=5),
                annotations=notes,
                **common,
            )
            f.write(json.dumps(done, separators=(",", ":")) + "\n")
            written += 1
    return written


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=300_000)
    p.add_argument("--quick", action="store_true", help="2000 records: a smoke run for tests")
    p.add_argument("--keep", metavar="PATH", help="write the generated log here and keep it")
    args = p.parse_args(argv)
    records = 2000 if args.quick else args.records
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "audit.log"
        started = time.perf_counter()
        n = generate(path, records)
        gen_s = time.perf_counter() - started
        size_mb = path.stat().st_size / 1e6
        rss_before = peak_rss_mib()

        started = time.perf_counter()
        summary = summarize([str(path)])
        sum_s = time.perf_counter() - started
        started = time.perf_counter()
        suggestion = suggest([str(path)])
        sug_s = time.perf_counter() - started

        data = summary.to_dict()
        assert data["records"] == n, (data["records"], n)
        assert data["malformed"] == 0
        result = {
            "records": n,
            "fileMB": round(size_mb, 1),
            "generateSeconds": round(gen_s, 2),
            "summarizeSeconds": round(sum_s, 3),
            "summarizeRecordsPerSecond": round(n / sum_s),
            "summarizeMBPerSecond": round(size_mb / sum_s, 1),
            "suggestSeconds": round(sug_s, 3),
            "suggestRecordsPerSecond": round(n / sug_s),
            "suggestedRules": len(suggestion.rules),
            "peakRSSMiBBeforeReview": round(rss_before, 1),
            "peakRSSMiBAfterReview": round(peak_rss_mib(), 1),
            "requests": data["totals"]["requests"],
        }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
