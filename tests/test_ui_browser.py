"""The web UI in a real browser: Debian's Chromium driven by Playwright, axe-core for accessibility.

One live service (auth on, embedded backend: the storage side is covered on
both backends by tests/test_ui.py) and one browser serve the whole module;
each test opens its own browser context (its own cookies). Without Chromium
the module is skipped with a loud message, and with CI=true that is a failure.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from testkit.files import sha256_of
from testkit.live_service import LiveService
from testkit.ui_browser import DESKTOP, KEYS, PHONE, UI_API_KEYS, chromium_path, seed
from tests.support.prerequisites import IN_CI, cannot_run


def _unavailable() -> str | None:
    try:
        import axe_playwright_python  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as e:
        return f"the UI browser tests need Playwright and axe-playwright-python (pip install -e '.[test]'): {e}"
    if chromium_path() is None:
        return "the UI browser tests need Chromium: apt-get install chromium (make test does it as root)"
    return None


@pytest.fixture(scope="module")
def service(request, tmp_path_factory):
    problem = _unavailable()
    if problem:
        if not IN_CI:
            # Past the output capture, on the terminal itself: a skipped browser suite must be seen.
            banner = "\n" + "!" * 78 + "\nSKIPPING UI BROWSER TESTS: " + problem + "\n" + "!" * 78
            with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
                print(banner, flush=True)
        cannot_run(problem)
    work = tmp_path_factory.mktemp("ui")
    svc = LiveService({"DATA_DIR": str(work / "data"), "MONGODB_URL": "", "ENABLE_AUTH": "true",
                       "API_KEYS": UI_API_KEYS}, work / "service.log")
    svc.start()
    try:
        svc.ids = seed(svc.url, work / "files", api_key=KEYS["admin"])
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def browser(service):
    from playwright.sync_api import sync_playwright

    from testkit.ui_browser import launch

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport=DESKTOP, base_url=service.url, accept_downloads=True)
    context.set_default_timeout(10_000)
    p = context.new_page()
    p.dialogs = []
    p.on("dialog", lambda d: (p.dialogs.append(d.message), d.dismiss()))
    yield p
    context.close()


def sign_in(page, scope: str = "read", path: str = "/ui") -> None:
    page.goto(path)
    assert urlsplit(page.url).path == "/ui/sign-in"
    page.fill("#api_key", KEYS[scope])
    follow(page, "form.signin button[type=submit]")
    assert page.locator(".who").count() == 1


def follow(page, selector: str) -> None:
    """Click what loads a new page, and wait until it has loaded."""
    with page.expect_navigation():
        page.click(selector)


def rows(page) -> list[str]:
    return page.locator("table.models tbody tr td:first-child").all_inner_texts()


def query_of(page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def test_sign_in_wrong_key_and_sign_out(page, service):
    page.goto("/ui")
    assert urlsplit(page.url).path == "/ui/sign-in"
    assert page.locator("table").count() == 0
    page.fill("#api_key", "not-a-key")
    follow(page, "form.signin button[type=submit]")
    assert page.locator("#problem").inner_text() == "That API key is not valid."
    assert page.locator("table").count() == 0

    page.fill("#api_key", KEYS["read"])
    follow(page, "form.signin button[type=submit]")
    assert urlsplit(page.url).path == "/ui"
    assert "read-user" in page.locator(".who").inner_text()
    cookie = next(c for c in page.context.cookies() if c["name"] == "tfms_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEYS["read"] not in cookie["value"]

    follow(page, ".who button")
    assert urlsplit(page.url).path == "/ui/sign-in"
    page.goto("/ui/statistics")
    assert urlsplit(page.url).path == "/ui/sign-in"


def test_sign_in_returns_to_the_page_asked_for(page, service):
    target = f"/ui/models/{service.ids['churn1']}"
    sign_in(page, "read", target)
    assert urlsplit(page.url).path == target


def test_search_and_filters_change_the_table_and_the_url(page, service):
    sign_in(page)
    assert len(rows(page)) == 9  # one row per name: churn's three versions show as its latest
    page.fill("#q", "churn")
    follow(page, ".filters button[type=submit]")
    assert query_of(page)["q"] == ["churn"]
    assert rows(page) == ["churn"]
    assert page.locator("table.models tbody td:nth-child(2)").all_inner_texts() == ["v2.0"]
    page.check("#versions")
    follow(page, ".filters button[type=submit]")
    assert query_of(page)["versions"] == ["all"]
    assert rows(page) == ["churn"] * 3
    assert page.locator(".count").inner_text() == "1–3 of 3 model versions"

    page.goto("/ui")
    page.select_option("#status", "deprecated")
    follow(page, ".filters button[type=submit]")
    assert query_of(page)["status"] == ["deprecated"]
    assert rows(page) == ["demand-forecast"]

    page.goto("/ui")
    page.fill("#tags", "nlp")
    page.fill("#min_accuracy", "0.9")
    page.select_option("#sort", "-metrics.accuracy")
    follow(page, ".filters button[type=submit]")
    q = query_of(page)
    assert q["tags"] == ["nlp"] and q["min_accuracy"] == ["0.9"] and q["sort"] == ["-metrics.accuracy"]
    assert rows(page) == ["spam-filter"]

    page.goto("/ui")
    page.fill("#algorithm", "random_forest")
    page.check("#versions")
    follow(page, ".filters button[type=submit]")
    assert rows(page) == ["churn"] * 3
    # The URL is the view: opened afresh, it shows the same rows and form.
    page.goto(page.url)
    assert rows(page) == ["churn"] * 3 and page.input_value("#algorithm") == "random_forest"
    assert page.is_checked("#versions")


def test_pagination(page, service):
    sign_in(page, "read", "/ui?sort=name&limit=4")
    first = rows(page)
    assert first == ["churn", "demand-forecast", "fraud-detector", "image-classifier"]
    assert page.locator(".count").inner_text() == "1–4 of 9 models"
    follow(page, "a[rel=next]")
    assert query_of(page)["page"] == ["2"] and query_of(page)["sort"] == ["name"]
    second = rows(page)
    assert second == ["legacy-ranker", "price-model", "sentiment", "spam-filter"]
    follow(page, "a[rel=next]")
    assert rows(page) == ["xss-test"]
    assert page.locator("a[rel=next]").count() == 0
    follow(page, "a[rel=prev]")
    assert rows(page) == second


def test_model_page_metadata_versions_and_download(page, service, tmp_path):
    sign_in(page, "read", "/ui?q=churn&sort=-created_at")
    follow(page, "table.models tbody tr:first-child a")
    assert urlsplit(page.url).path == f"/ui/models/{service.ids['churn2']}"
    assert page.locator("h1").inner_text().split() == ["churn", "v2.0", "active"]
    facts = page.locator("dl.facts").inner_text()
    assert "random_forest" in facts and "ml-team" in facts
    assert "n_estimators\n200" in page.locator("section.card", has_text="Hyperparameters").inner_text()
    assert "accuracy\n0.95" in page.locator("section.card", has_text="Metrics").inner_text()
    timeline = page.locator("ol.timeline li").all_inner_texts()
    assert [t.split()[0] for t in timeline] == ["v2.0", "v1.1", "v1.0"]
    assert "from v1.1" in timeline[0] and "from v1.0" in timeline[1]

    with page.expect_download() as info:
        page.click("table.files a")
    download = info.value
    assert download.suggested_filename == "churn-2.pkl"
    saved = tmp_path / "got.pkl"
    download.save_as(saved)
    assert sha256_of(saved) == sha256_of(Path(service.ids["churn2_path"]))
    assert sha256_of(saved) == page.locator("table.files code.hash").inner_text()

    assert page.locator("p.notice").count() == 0  # v2.0 is the latest
    follow(page, "ol.timeline a:text('v1.1')")
    assert urlsplit(page.url).path == f"/ui/models/{service.ids['churn1']}"
    assert page.locator("p.notice").inner_text() == "The latest version of churn is v2.0."
    with page.expect_download() as info:
        page.click("a.button.primary")
    info.value.save_as(tmp_path / "v11.pkl")
    assert sha256_of(tmp_path / "v11.pkl") == sha256_of(Path(service.ids["churn1_path"]))


def test_copy_buttons_copy_the_exact_commands(page, service):
    from playwright.sync_api import expect

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.url)
    model_id = service.ids["churn2"]
    sign_in(page, "read", f"/ui/models/{model_id}")
    expected = {
        "curl-cmd": f'curl -fOJ -H "X-API-Key: $MODEL_SERVICE_API_KEY" {service.url}/api/v1/models/{model_id}/download',
        "pull-cmd": f"model-service pull {model_id} --url {service.url}",
    }
    for element, command in expected.items():
        button = page.locator(f"button[data-copy={element}]")
        button.click()
        expect(button).to_have_text("Copied")  # once the clipboard's promise has resolved
        assert page.evaluate("navigator.clipboard.readText()") == command


def test_write_actions_follow_the_scope_and_the_csrf_token(page, service):
    model_id = service.ids["price-model"]
    sign_in(page, "read", f"/ui/models/{model_id}")
    assert page.locator("#new-status").count() == 0  # no form for a read key
    token = page.locator(".who input[name=csrf]").input_value()
    resp = page.request.post(f"/ui/models/{model_id}/status", form={"status": "archived", "csrf": token},
                             max_redirects=0)
    assert resp.status == 403 and "this action needs write" in resp.text()
    follow(page, ".who button")

    sign_in(page, "write", f"/ui/models/{model_id}")
    assert page.locator("a.button.danger").count() == 0  # delete is for admin
    page.select_option("#new-status", "deprecated")
    follow(page, "form:has(#new-status) button")
    assert urlsplit(page.url).path == f"/ui/models/{model_id}"
    assert page.locator("h1 .status").inner_text() == "deprecated"
    page.fill("#new-tags", "pricing, reviewed")
    follow(page, "form:has(#new-tags) button")
    assert page.locator("dl.facts .tag").all_inner_texts() == ["pricing", "reviewed"]

    resp = page.request.post(f"/ui/models/{model_id}/status", form={"status": "archived"}, max_redirects=0)
    assert resp.status == 403 and "security token" in resp.text()
    resp = page.request.post(f"/ui/models/{model_id}/delete", form={"csrf": token}, max_redirects=0)
    assert resp.status == 403
    page.reload()
    assert page.locator("h1 .status").inner_text() == "deprecated"


def test_admin_deletes_after_confirming(page, service):
    model_id = service.ids["legacy-ranker"]
    sign_in(page, "admin", f"/ui/models/{model_id}")
    follow(page, "a.button.danger")
    assert page.locator("h1").inner_text() == "Delete legacy-ranker v1.0?"
    follow(page, "button.danger")
    assert page.locator(".notice").inner_text() == "Deleted legacy-ranker v1.0."
    assert "legacy-ranker" not in rows(page)
    assert page.goto(f"/ui/models/{model_id}").status == 404


def test_script_in_a_description_shows_as_text(page, service):
    sign_in(page, "read", f"/ui/models/{service.ids['xss']}")
    assert page.locator("p.description").inner_text() == "<script>alert(1)</script>"
    assert "<img src=x onerror=alert(2)>" in page.locator("dl.facts").inner_text()
    page.goto("/ui?q=xss")
    assert page.locator("table.models .tag").inner_text() == "<b>bold</b>"
    page.goto("/ui/statistics")
    assert page.dialogs == []


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_no_serious_accessibility_violations(browser, service, viewport):
    from axe_playwright_python.sync_playwright import Axe

    axe = Axe()
    context = browser.new_context(viewport=viewport, base_url=service.url)
    try:
        page = context.new_page()
        page.goto("/ui/sign-in")
        pages = {"sign-in": "/ui/sign-in", "models": "/ui", "model": f"/ui/models/{service.ids['churn2']}",
                 "statistics": "/ui/statistics", "error": "/ui?status=bogus",
                 "delete": f"/ui/models/{service.ids['churn0']}/delete"}
        found = {}
        for name, path in pages.items():
            if name == "models":
                page.fill("#api_key", KEYS["admin"])
                follow(page, "form.signin button[type=submit]")
            page.goto(path)
            assert re.sub(r"\?.*", "", urlsplit(page.url).path) == urlsplit(path).path, name
            violations = axe.run(page).response["violations"]
            bad = [f"{v['id']} ({v['impact']}): {v['help']}" for v in violations
                   if v["impact"] in ("serious", "critical")]
            if bad:
                found[name] = bad
            print(f"axe {viewport['width']}px {name}: {len(violations)} violation(s)",
                  ", ".join(f"{v['id']} ({v['impact']})" for v in violations))
        assert found == {}
    finally:
        context.close()


def test_everything_but_copying_works_without_javascript(browser, service):
    context = browser.new_context(viewport=PHONE, base_url=service.url, java_script_enabled=False)
    try:
        page = context.new_page()
        model_id = service.ids["sentiment"]
        sign_in(page, "write", "/ui?q=sentiment")
        assert rows(page) == ["sentiment"]
        follow(page, "table.models a")
        assert urlsplit(page.url).path == f"/ui/models/{model_id}"
        assert page.locator("button[data-copy]").first.is_hidden()  # nothing to click that cannot work
        page.fill("#new-tags", "nlp, no-js")
        follow(page, "form:has(#new-tags) button")
        assert page.locator("dl.facts .tag").all_inner_texts() == ["nlp", "no-js"]
    finally:
        context.close()
