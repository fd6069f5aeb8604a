"""Debian's Chromium under Playwright, and a small registry to show it, for the UI's
browser tests (tests/test_ui_browser.py) and screenshots (bench/ui_screenshots.py).

No browser can be downloaded here, so Playwright drives /usr/bin/chromium
(``apt-get install chromium``; ``make test`` installs it as root). Without the
background-networking flags Chromium keeps dialling out and the closed network
refuses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tensorfleet_client import ModelServiceClient

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}

# Keys for a service started with ENABLE_AUTH=true API_KEYS=<UI_API_KEYS>.
KEYS = {"read": "ui-read-key-0123456789", "write": "ui-write-key-0123456789", "admin": "ui-admin-key-0123456789"}
UI_API_KEYS = ",".join(f"{key}:{scope}:{scope}-user" for scope, key in KEYS.items())


def chromium_path() -> str | None:
    """CHROMIUM if set, else Debian's Chromium; None when that is not there."""
    wanted = os.environ.get("CHROMIUM")
    if wanted is not None:
        return wanted if os.access(wanted, os.X_OK) else None
    found = shutil.which("chromium") or "/usr/bin/chromium"
    return found if os.access(found, os.X_OK) else None


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)


def seed(url: str, work_dir: Path, api_key: str | None = None) -> dict[str, str]:
    """A small registry: several algorithms and statuses, a lineage of three versions with
    files, downloads. Returns the ids the tests and screenshots look at."""
    ids: dict[str, str] = {}
    work_dir.mkdir(parents=True, exist_ok=True)
    with ModelServiceClient(url, api_key=api_key) as client:
        for i, (name, algorithm, accuracy, tags, status) in enumerate([
            ("fraud-detector", "xgboost", 0.981, ["fraud", "production"], "active"),
            ("image-classifier", "resnet50", 0.912, ["vision"], "active"),
            ("sentiment", "bert", 0.887, ["nlp", "production"], "active"),
            ("demand-forecast", "prophet", 0.74, ["forecasting"], "deprecated"),
            ("legacy-ranker", "lightgbm", 0.69, ["ranking"], "archived"),
            ("spam-filter", "naive_bayes", 0.955, ["nlp"], "active"),
            ("price-model", "linear_regression", 0.81, ["pricing"], "active"),
        ]):
            ids[name] = client.register_model(
                name=name, algorithm=algorithm, metrics={"accuracy": accuracy, "f1_score": round(accuracy - 0.02, 3)},
                hyperparameters={"learning_rate": 0.01 * (i + 1), "epochs": 10 + i}, tags=tags, status=status,
                description=f"{name.replace('-', ' ').capitalize()} trained on the 2026 data.",
                dataset_info={"name": f"{name}-data-2026", "rows": 10_000 * (i + 1)})
        # churn: three versions, each with a file, v1.0 -> v1.1 -> v2.0.
        for n, (accuracy, breaking) in enumerate([(0.91, False), (0.93, False), (0.95, True)]):
            path = work_dir / f"churn-{n}.pkl"
            path.write_bytes(bytes(range(256)) * (400 * (n + 1)) + f"churn {n}".encode())
            ids[f"churn{n}"] = client.push(path, name="churn", algorithm="random_forest",
                                           metrics={"accuracy": accuracy, "auc": accuracy + 0.03},
                                           hyperparameters={"n_estimators": 100 + 50 * n, "max_depth": 8},
                                           tags=["churn", "production"] if n == 2 else ["churn"],
                                           description="Predicts which customers leave next month.",
                                           breaking_changes=breaking, created_by="ml-team")
            ids[f"churn{n}_path"] = str(path)
        ids["xss"] = client.register_model(
            name="xss-test", algorithm="<img src=x onerror=alert(2)>", description="<script>alert(1)</script>",
            tags=["<b>bold</b>"], metrics={"<i>m</i>": 1.0})
        for _ in range(3):
            client.download(ids["churn2"], work_dir / "pulled.pkl", overwrite=True)
        client.download(ids["churn1"], work_dir / "pulled.pkl", overwrite=True)
    return ids
