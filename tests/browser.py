"""Open a self-contained HTML report in a real headless Chromium, as a user would.

Shared by every report test (routing, comparison, curation). `check_page` loads the page from
disk with the network off, and fails on any console error, on a page error, on an image that did
not load (zero natural size) and on a request that left the machine. A screenshot is kept for
people to look at (`out_png`).

Debian's `chromium` is driven through Playwright's Python package with `executable_path`: the
package's own browser download cannot run here (no network beyond the package registries).
`make test` installs `chromium` with apt where it runs as root; elsewhere `skip_reason()` says
why the test is skipped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

# What the probe of this workplace found necessary: a root user needs --no-sandbox, and the
# background services would try (and fail) to reach the network on every start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path() -> str | None:
    for path in CANDIDATES:
        if Path(path).exists():
            return path
    return shutil.which("chromium")


def skip_reason() -> str | None:
    """None when the browser test can run; otherwise why not, for `pytest.skip`."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return ("no Chromium on this machine: `make test` installs Debian's chromium when it "
                "runs as root with apt-get; install it with `apt-get install chromium`")
    return None


@dataclass
class PageCheck:
    """What the browser saw: console errors, images with their natural sizes, outside requests."""

    console_errors: list[str] = field(default_factory=list)
    images: list[tuple[str, int, int]] = field(default_factory=list)  # (alt, width, height)
    external_requests: list[str] = field(default_factory=list)
    title: str = ""
    text: str = ""


def check_page(html: Path, out_png: Path, width: int = 1280) -> PageCheck:
    """Load `html` from disk, screenshot the full page to `out_png`, and assert it is sound:
    no console or page errors, every <img> decoded with a non-zero size, no network request."""
    from playwright.sync_api import sync_playwright

    seen = PageCheck()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: m.type == "error" and seen.console_errors.append(m.text))
            page.on("pageerror", lambda e: seen.console_errors.append(str(e)))
            page.on("request", lambda r: _is_external(r.url) and seen.external_requests.append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            seen.images = [tuple(x) for x in page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.naturalWidth, i.naturalHeight])")]
            seen.title = page.title()
            seen.text = page.inner_text("body")
            out_png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out_png), full_page=True)
        finally:
            browser.close()
    assert not seen.console_errors, f"{html}: console errors {seen.console_errors}"
    assert not seen.external_requests, f"{html}: requests left the page {seen.external_requests}"
    broken = [alt for alt, w, h in seen.images if w == 0 or h == 0]
    assert not broken, f"{html}: images that did not load: {broken}"
    return seen


def _is_external(url: str) -> bool:
    return not url.startswith(("file:", "data:", "about:", "blob:"))
