"""`apiproxy audit summarize|suggest|report FILE...`: review what peers read and what was
refused."""

from __future__ import annotations

import argparse
import json
import sys

from apiproxy import flags
from apiproxy.audit.report import write_report
from apiproxy.audit.review import Filter, parse_when, render_table, summarize
from apiproxy.audit.suggest import render, suggest
from apiproxy.errors import UserError


def _common(p: flags.Parser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="audit log files (rotated and .gz files too; '-' reads stdin)",
    )
    p.option(
        "--peer",
        "only this peer (repeatable); 'system:anonymous' selects authentication failures",
        repeatable=True,
        metavar="NAME",
    )
    p.option(
        "--since",
        "only requests received at or after TIME: RFC 3339, a date, or an age like 2h, 7d",
        type=_when,
        metavar="TIME",
    )
    p.option("--until", "only requests received before TIME", type=_when, metavar="TIME")


def _when(value: str, flag: str) -> str:
    try:
        return parse_when(value)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None


def _parser(prog: str) -> flags.Parser:
    parser = flags.Parser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "summarize",
        help="per-peer requests, refusals, errors, bytes, watch time and top refused requests",
    )
    _common(s)
    s.switch("--denied", "only refused requests (policy denials and authentication failures)")
    s.option(
        "--output",
        "table or json",
        default="table",
        type=flags.choice("table", "json"),
        aliases=("-o",),
    )
    s.option(
        "--top",
        "refused requests to list",
        default="10",
        type=flags.number(minimum=0),
        metavar="N",
    )
    g = sub.add_parser(
        "suggest",
        help="policy rules that would have allowed the denied requests (for review, never applied)",
    )
    _common(g)
    r = sub.add_parser(
        "report",
        help="the summary as one self-contained HTML page with charts (no network fetches)",
    )
    _common(r)
    r.switch("--denied", "only refused requests (policy denials and authentication failures)")
    r.option(
        "--top",
        "refused requests to list",
        default="10",
        type=flags.number(minimum=0),
        metavar="N",
    )
    r.option("--html", "write the page to OUT", required=True, metavar="OUT")
    return parser


def _filter(args: argparse.Namespace, denied_only: bool = False) -> Filter:
    since, until = args.since, args.until
    if since and until and since >= until:
        raise UserError(f"--since ({since}) must be before --until ({until})")
    return Filter(frozenset(args.peer), since, until, denied_only)


def main(argv: list[str], prog: str) -> int:
    args = _parser(prog).parse_args(argv)
    if args.files.count("-") > 1:
        raise UserError("stdin ('-') can be given only once")
    if args.command == "report":
        report = write_report(args.files, args.html, _filter(args, args.denied), args.top)
        stats = report.summary.stats
        print(
            f"{prog}: wrote {args.html}: {len(report.summary.peers)} peer(s), "
            f"{stats.records} records"
            + (f", {stats.malformed} malformed" if stats.malformed else ""),
            file=sys.stderr,
        )
        return 0
    if args.command == "summarize":
        summary = summarize(args.files, _filter(args, args.denied))
        if args.output == "json":
            json.dump(summary.to_dict(args.top), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render_table(summary, args.top))
        return 0
    result = suggest(args.files, _filter(args))
    sys.stdout.write(render(result, result.stats.files))
    if result.stats.malformed:
        print(
            f"{prog}: warning: {result.stats.malformed} malformed line(s) skipped, e.g. "
            f"{result.stats.malformed_examples[0]}",
            file=sys.stderr,
        )
    return 0
