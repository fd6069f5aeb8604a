"""The README's configuration table stays complete."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_variable_the_config_reads_is_documented():
    source = (REPO / "app" / "config.py").read_text()
    read = set(re.findall(r'env, "([A-Z_]+)"', source)) | set(re.findall(r'_raw\(env, "([A-Z_]+)"\)', source))
    read |= set(re.findall(r'_(?:size|int|str|bool|name|choice|paths)\(env, "([A-Z_]+)"', source))
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Z_]+)` \|", readme, re.M))
    assert len(read) > 20
    assert read - table == set(), "variables missing from the README table"
    assert table - read == set(), "README documents variables the service does not read"
