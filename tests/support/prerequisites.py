"""What a test does when something it needs is not here: the one rule, declared once.

With CI=true a test that cannot run fails, saying why: nothing is skipped
silently there. Elsewhere it is skipped with the same message.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def cannot_run(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
