"""The built documentation site, opened in headless Chromium: the API index lists every public name, search finds
``rigl``, and a screenshot of the front page lands in ``docs/_build/``.

Run by ``make docs-test`` after ``make docs`` (CI installs Debian's ``chromium`` when it is missing).
"""

from __future__ import annotations

import html
import importlib
import pathlib
import re
import shutil
import subprocess

import pytest

HTML = pathlib.Path(__file__).resolve().parent / "_build" / "html"
PUBLIC_PACKAGES = ["jaxsparse", "jaxsparse.flax", "jaxsparse.posttraining", "pallas_kernels"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium on PATH: `apt-get install chromium` (the CI script installs it)")


def _browse(page: str, *extra: str) -> str:
    """The DOM of ``page`` after its scripts ran (Sphinx's search runs in the page's JavaScript)."""
    assert (HTML / page.split("?")[0]).exists(), f"build the site first: make docs (missing {page})"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
        "--virtual-time-budget=15000",
        *extra,
        f"file://{HTML}/{page}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def _public_names() -> list[tuple[str, str]]:
    names = []
    for package in PUBLIC_PACKAGES:
        mod = importlib.import_module(package)
        names += [(package, name) for name in mod.__all__]
    return names


def test_api_index_lists_every_public_name():
    dom = html.unescape(_browse("genindex.html", "--dump-dom"))
    anchors = {a.removeprefix("module-") for a in re.findall(r'href="[^"]*#([\w.-]+)"', dom)}
    missing = []
    for package, name in _public_names():
        # A name re-exported under two public paths is documented once, at its first path.
        if f"{package}.{name}" not in anchors and not any(a.endswith("." + name) for a in anchors):
            missing.append(f"{package}.{name}")
    assert not missing, f"not in the API index: {missing}"


def test_search_finds_rigl():
    dom = html.unescape(_browse("search.html?q=rigl", "--dump-dom"))
    assert re.search(r'href="[^"]*api/dst\.html[^"]*#jaxsparse\.rigl"', dom), dom[-3000:]


def test_front_page_screenshot():
    shot = HTML.parent / "screenshot.png"
    shot.unlink(missing_ok=True)
    _browse("index.html", f"--screenshot={shot}", "--window-size=1280,1000")
    assert (
        shot.exists()
        and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and shot.stat().st_size > 10_000
    )
