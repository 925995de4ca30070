"""Screenshots of the built documentation site in headless Chromium, with no network.

Usage (after ``mkdocs build``; needs a Chromium or Chrome binary)::

    python docs/screenshots.py --site site --out runs/screenshots

The site is served from ``--site`` on a local port and each page is captured at
desktop width (``--width``), so a reader can check the theme, the rendered math,
the tables and the plots without a browser of their own. Chromium runs with its
network limited to the local server: a page that needed a CDN shows it here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading

PAGES = {
    "home": "",
    "methods": "math/",
    "benchmarks": "benchmarks/",
    "api_recipes": "api/recipes/",
}
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser(explicit: str | None = None) -> str:
  """Returns the path of a Chromium-family browser, or raises naming what was tried."""
  for name in ([explicit] if explicit else BROWSERS):
    path = shutil.which(name)
    if path:
      return path
  raise SystemExit(f"no browser found (tried {', '.join([explicit] if explicit else BROWSERS)}); "
                   "pass --browser")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args


@contextlib.contextmanager
def serve(directory: str):
  """Serves ``directory`` on a free local port; yields the base URL."""
  handler = functools.partial(_QuietHandler, directory=directory)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()


def capture(browser: str, url: str, path: str, width: int, height: int) -> None:
  """Writes a PNG of ``url`` at ``width`` × ``height`` pixels."""
  with tempfile.TemporaryDirectory() as profile:
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           # Nothing but the local server: an external script or font would fail to load.
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           f"--window-size={width},{height}", f"--screenshot={os.path.abspath(path)}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main(argv=None) -> list[str]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--site", default="site", help="the built site (mkdocs build --site-dir)")
  p.add_argument("--out", default="runs/screenshots")
  p.add_argument("--browser", default=None)
  p.add_argument("--width", type=int, default=1400)
  p.add_argument("--height", type=int, default=2400)
  p.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated, of {list(PAGES)}")
  args = p.parse_args(argv)
  if not os.path.isfile(os.path.join(args.site, "index.html")):
    raise SystemExit(f"{args.site}/index.html not found: build the site first (mkdocs build)")
  names = [n for n in args.pages.split(",") if n]
  unknown = sorted(set(names) - set(PAGES))
  if unknown:
    raise SystemExit(f"unknown pages {unknown}; choose from {list(PAGES)}")
  browser = find_browser(args.browser)
  os.makedirs(args.out, exist_ok=True)
  written = []
  with serve(args.site) as base:
    for name in names:
      path = os.path.join(args.out, f"{name}.png")
      capture(browser, base + PAGES[name], path, args.width, args.height)
      print(path, flush=True)
      written.append(path)
  return written


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
