"""``python -m bench.ui_screenshots``: the web UI's pages as PNGs in docs/ui/ (README shows them).

Starts the service (embedded backend, auth on) in a temporary folder, fills it
with a small demo registry, signs in with the admin key in Debian's Chromium
and shoots each page at a desktop and a 390 px phone viewport.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from testkit.live_service import LiveService
from testkit.mongo_server import REPO
from testkit.ui_browser import DESKTOP, KEYS, PHONE, UI_API_KEYS, chromium_path, launch, seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ui")
    args = parser.parse_args(argv)
    if chromium_path() is None:
        parser.exit(1, "needs Chromium: apt-get install chromium\n")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        service = LiveService({"DATA_DIR": str(work / "data"), "MONGODB_URL": "", "ENABLE_AUTH": "true",
                               "API_KEYS": UI_API_KEYS}, work / "service.log")
        service.start()
        try:
            ids = seed(service.url, work / "files", api_key=KEYS["admin"])
            with sync_playwright() as p:
                browser = launch(p)
                for device, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
                    context = browser.new_context(viewport=viewport, device_scale_factor=1)
                    page = context.new_page()
                    page.goto(service.url + "/ui/models/" + ids["churn2"])  # shows sign-in first
                    _shoot(page, args.out / f"sign-in-{device}.png")
                    page.fill("#api_key", KEYS["admin"])
                    page.click("button[type=submit]")
                    page.wait_for_selector("h1 .version")
                    _shoot(page, args.out / f"model-{device}.png")
                    page.goto(service.url + "/ui?sort=-metrics.accuracy")
                    _shoot(page, args.out / f"models-{device}.png")
                    page.goto(service.url + "/ui/statistics")
                    _shoot(page, args.out / f"statistics-{device}.png")
                    context.close()
                browser.close()
        finally:
            service.stop()
    for png in sorted(args.out.glob("*.png")):
        print(f"{png.relative_to(REPO)}  {png.stat().st_size // 1024} KiB")
    return 0


def _shoot(page, path: Path) -> None:
    # A palette of 64 colours keeps text crisp and each PNG a few tens of KiB in the repo.
    Image.open(io.BytesIO(page.screenshot(full_page=True))).quantize(64).save(path, optimize=True)


if __name__ == "__main__":
    raise SystemExit(main())
