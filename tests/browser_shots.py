"""The docs' screenshots of `vlbatch serve` and `vlbatch gallery` in headless Chromium; the browser tests' helpers.

    .venv/bin/python tests/browser_shots.py docs/screenshots

builds the tiny random-weight model and a results database (tests/web_env.py) in a temporary folder, serves it with
`vlbatch serve`, writes the static gallery with `vlbatch gallery`, and saves gallery.png (/-/gallery), charts.png
(/-/charts, the whole page) and static-gallery.png (the static pages from file://), 1280x900, and results-table.png
(Datasette's results table, 1400x900: the file, its preview and the answer on the first screen) into the folder given.

The browser is Debian's chromium (/usr/bin/chromium, `apt-get install chromium`) driven by playwright's Python
package: playwright never downloads a browser of its own here. tests/test_browser.py imports the helpers below, so
the tests and the screenshots start the browser and the server the same way. Not collected by pytest (its name
does not start with test_).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # run as a script: web_env, spool_env and synthetic live beside this file
    sys.path.insert(0, str(TESTS))

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright
    from spool_env import SpoolEnv

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
VIEWPORT = {"width": 1280, "height": 900}
WIDE = {"width": 1400, "height": 900}
SERVE_URL = re.compile(r"read-only at (http://\S+/) ")

# every <img> on the page has finished (loaded or failed) and no failed one is left: the cards replace a failed
# preview with "no preview", the table cells remove it
IMAGES_SETTLED = "() => Array.from(document.images).every((i) => i.complete && i.naturalWidth > 0)"
SCROLL_IMAGES = """async () => {
  for (const img of Array.from(document.images)) {
    img.scrollIntoView({block: "center"});
    await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  }
}"""


def browser_problem() -> str | None:
    """Why the browser tests cannot run here (None: they can, as far as can be told without starting Chromium)."""
    if not CHROMIUM.is_file():
        return f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"the playwright package is not installed ({exc}): pip install -e '.[dev]'"
    return None


def launch_chromium(playwright: Playwright) -> Browser:
    """Headless Debian chromium: playwright's own browser downloads are never used."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))


def child_env() -> dict[str, str]:
    """This process's environment without VLBATCH_* variables: the config file alone decides."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}


def start_serve(
    env: SpoolEnv, cache_dir: Path, log: Path | None = None, timeout: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """`vlbatch serve --port 0` over env's database: the process and the URL it printed (its stderr goes to `log`,
    by default serve.log beside cache_dir, so a chatty server never fills a pipe)."""
    log = log or Path(cache_dir).parent / "serve.log"
    with open(log, "w") as err:
        process = subprocess.Popen(
            env.cli("serve", "--port", "0", "--thumbnail-cache", str(cache_dir)),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env(),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = SERVE_URL.search(log.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"vlbatch serve printed no URL (exit {process.returncode}):\n{log.read_text(errors='replace')}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_static_gallery(env: SpoolEnv, out_dir: Path, cache_dir: Path, *options: str) -> Path:
    """`vlbatch gallery OUT_DIR` as a subprocess; index.html's path."""
    command = env.cli("gallery", str(out_dir), "--thumbnail-cache", str(cache_dir), *options)
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return Path(out_dir) / "index.html"


def settle_images(page: Page, timeout: float = 30_000) -> bool:
    """Scroll every image into view (lazy ones load only then) and wait until each has loaded or been replaced;
    False when some are still pending or broken after `timeout` ms (the caller's assertions say which)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.evaluate(SCROLL_IMAGES)
    try:
        page.wait_for_function(IMAGES_SETTLED, timeout=timeout)
    except PlaywrightTimeout:
        return False
    finally:
        page.evaluate("window.scrollTo(0, 0)")
    return True


def build_results(root: Path) -> SpoolEnv:
    """The tiny model exported to ONNX, and the viewer tests' results folder (tests/web_env.py) under root."""
    from web_env import make_results

    from batch.model.export.exporter import export
    from batch.model.tinymodel import make_model

    hf = make_model(root / "tiny-hf", preset="tiny", seed=0)
    onnx = root / "tiny-onnx"
    export(hf, onnx)
    results = root / "results"
    results.mkdir()
    return make_results(results, onnx)


def take_screenshots(out_dir: Path, work: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    env = build_results(work)
    cache = work / "thumbnails"
    index = write_static_gallery(env, work / "static-gallery", cache)
    process, url = start_serve(env, cache)
    shots = []
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                for name, address, full_page, viewport in (
                    ("gallery.png", url + "-/gallery", False, VIEWPORT),
                    ("charts.png", url + "-/charts", True, VIEWPORT),  # all three charts
                    ("static-gallery.png", index.as_uri(), False, VIEWPORT),
                    ("results-table.png", url + "vlbatch/results", False, WIDE),
                ):
                    page.set_viewport_size(viewport)
                    page.goto(address, wait_until="load")
                    settle_images(page)
                    shots.append(out_dir / name)
                    page.screenshot(path=str(shots[-1]), full_page=full_page)
            finally:
                browser.close()
    finally:
        stop(process)
    return shots


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(sys.argv[0]).name} OUT_DIR", file=sys.stderr)
        return 2
    problem = browser_problem()
    if problem:
        print(f"browser_shots: {problem}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlbatch-shots-") as work:
        shots = take_screenshots(Path(argv[0]), Path(work))
    for shot in shots:
        print(shot)
    print(f"browser_shots: {len(shots)} screenshots in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
