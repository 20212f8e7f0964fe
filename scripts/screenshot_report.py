#!/usr/bin/env python
"""Renders a benchmark report (``report.html``) in headless Chromium and saves a PNG screenshot.

Usage:
    python scripts/screenshot_report.py runs/demo/report.html --out runs/demo/report.png
    python scripts/screenshot_report.py runs/demo/report.html --width 1400 --height 9000

Chromium (Debian: ``apt-get install -y chromium``) is started with a new, empty profile and every
background service off, so the screenshot needs no network and leaves nothing behind. Chromium's
``--screenshot`` captures one window, so the window is made tall (``--height``) and the blank strip
below the page's end is cropped afterwards (``--no-trim`` keeps it). Exit status: 0 ok, 2 when no
browser is found or it wrote no image.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome-headless-shell")


def find_browser(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit`` if given, else the first of :data:`BROWSERS` on PATH."""
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def trim_bottom(png: Path, margin: int = 24) -> tuple[int, int]:
    """Crops the uniform background strip below the page's content; returns the new (width, height)."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, background).getbbox()
    if box is None:
        return rgb.size
    bottom = min(rgb.height, box[3] + margin)
    if bottom < rgb.height:
        rgb = rgb.crop((0, 0, rgb.width, bottom))
        rgb.save(png)
    return rgb.size


def screenshot(report: Path, out: Path, *, width: int = 1400, height: int = 8000, browser: str | None = None,
               timeout: float = 120.0, trim: bool = True) -> Path:
    """Renders ``report`` into ``out`` (PNG) and returns ``out``.

    Raises:
        FileNotFoundError: the report or the browser is missing.
        RuntimeError: the browser failed or wrote no image (its stderr tail is in the message).
    """
    report = Path(report).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"{report}: report not found")
    exe = find_browser(browser)
    if exe is None:
        raise FileNotFoundError("no Chromium found (tried " + ", ".join(BROWSERS) + "); install it, e.g. "
                                "`apt-get install -y chromium`, or pass --browser PATH")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    with tempfile.TemporaryDirectory(prefix="s2v-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
               "--mute-audio", f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={width},{height}",
               report.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"{exe} wrote no screenshot (exit {proc.returncode}): {proc.stderr[-800:]}")
    if trim:
        trim_bottom(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("report", help="report.html to render")
    parser.add_argument("--out", default=None, help="PNG to write (default: <report folder>/report.png)")
    parser.add_argument("--width", type=int, default=1400, help="window width in CSS pixels")
    parser.add_argument("--height", type=int, default=8000, help="window height (the page is cropped to content)")
    parser.add_argument("--browser", default=None, help="Chromium executable (default: found on PATH)")
    parser.add_argument("--no-trim", action="store_true", help="keep the blank strip below the page")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.report).with_name("report.png")
    try:
        path = screenshot(Path(args.report), out, width=args.width, height=args.height, browser=args.browser,
                          trim=not args.no_trim)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"screenshot_report: error: {err}", file=sys.stderr)
        return 2
    from PIL import Image

    with Image.open(path) as im:
        print(f"wrote {path} ({im.size[0]} x {im.size[1]} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
