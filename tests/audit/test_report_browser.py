"""`apiproxy audit report` pages in a real headless Chromium (Debian's `chromium`, installed by
scripts/ensure-tools): loaded from a file, the charts are laid out with non-empty marks (counted
by the page's own script), the screenshot shows them, and hostile log text cannot run script."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from apiproxy.audit import report as rep
from tests.audit.test_report import hostile_records, traffic

APIPROXY = str(Path(sys.executable).with_name("apiproxy"))
WINDOW = (1000, 1400)


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium not found: ./scripts/ensure-tools installs Debian's chromium"
    profile = tmp_path / "chromium-profile"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"]
    cmd += ["--no-first-run", "--disable-background-networking", "--disable-component-update"]
    cmd += ["--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars"]
    cmd += [f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def dump_dom(tmp_path: Path, page: Path) -> str:
    return chromium(tmp_path, page, "--dump-dom").stdout


def write_page(tmp_path: Path, log: Path) -> Path:
    out = tmp_path / "report.html"
    proc = subprocess.run(
        [APIPROXY, "audit", "report", str(log), "--html", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8
    assert colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) if bpp == 3 else _rgb(r) for r in rows]


def _rgb(rgba: bytes) -> bytes:
    return bytes(b for i, b in enumerate(rgba) if i % 4 != 3)


def count_colour(rows: list[bytes], hex_colour: str) -> int:
    target = bytes.fromhex(hex_colour.lstrip("#"))
    return sum(1 for row in rows for i in range(0, len(row), 3) if row[i : i + 3] == target)


def test_charts_render_in_chromium(tmp_path, synth, log_writer):
    page = write_page(tmp_path, log_writer(tmp_path / "audit.log", traffic(synth)))
    html = page.read_text()
    expected = len(re.findall(r'<rect class="mark', html))
    assert expected > 10
    dom = dump_dom(tmp_path, page)
    # the page's own script ran (its CSP hash matched) and found every mark laid out
    (total,) = re.findall(r'<html[^>]* data-drawn-marks="(\d+)"', dom)
    assert int(total) == expected
    assert f">{expected} chart marks drawn<" in dom
    charts = re.findall(r'<svg class="chart ([a-z]+)"[^>]* data-drawn-marks="(\d+)"', dom)
    assert len(charts) == html.count('<svg class="chart')
    # one timeline per peer, each with bars, and the two summary bar charts
    assert [kind for kind, _ in charts].count("timeline") == 3
    assert all(int(n) > 0 for _, n in charts), charts
    # and on screen: the blue and red bars are there in the screenshot
    shot = tmp_path / "shot.png"
    chromium(tmp_path, page, f"--screenshot={shot}")
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == WINDOW
    assert count_colour(rows, rep.BLUE) > 500
    assert count_colour(rows, rep.RED) > 500
    assert count_colour(rows, "#ffffff") > width * height // 2  # a page, not a blank or a crash


def test_hostile_log_text_cannot_script_the_page(tmp_path, synth, log_writer):
    page = write_page(tmp_path, log_writer(tmp_path / "audit.log", hostile_records(synth)))
    dom = dump_dom(tmp_path, page)
    assert "<title>apiproxy audit report</title>" in dom
    assert "pwned</title>" not in dom
    assert "<img" not in dom
    assert "&lt;img src=x onerror=" in dom  # shown as text
    assert re.search(r'<html[^>]* data-drawn-marks="[1-9]\d*"', dom)


def test_the_content_security_policy_blocks_any_other_script(tmp_path, synth, log_writer):
    """Were escaping ever to fail, an injected inline script still would not run."""
    page = write_page(tmp_path, log_writer(tmp_path / "audit.log", traffic(synth)))
    html = page.read_text()
    page.write_text(html.replace("<h1>", '<script>document.title = "injected ran"</script><h1>', 1))
    dom = dump_dom(tmp_path, page)
    assert "injected ran" not in dom.split("<body")[0]
    assert "<title>apiproxy audit report</title>" in dom
    assert re.search(r'<html[^>]* data-drawn-marks="[1-9]\d*"', dom)  # ours still ran


def test_the_count_is_of_marks_the_browser_laid_out(tmp_path, synth, log_writer):
    """A mark with no area (nothing drawn) is not counted: the count measures layout, not markup."""
    page = write_page(tmp_path, log_writer(tmp_path / "audit.log", traffic(synth)))
    html = page.read_text()
    expected = len(re.findall(r'<rect class="mark', html))
    empty = '<svg class="chart empty" width="10" height="10">'
    empty += '<rect class="mark" width="0" height="0"/></svg>'
    page.write_text(html.replace("<h2>Peers</h2>", empty + "<h2>Peers</h2>", 1))
    dom = dump_dom(tmp_path, page)
    (total,) = re.findall(r'<html[^>]* data-drawn-marks="(\d+)"', dom)
    assert int(total) == expected
    assert re.search(r'<svg class="chart empty"[^>]* data-drawn-marks="0"', dom)
