"""Helpers shared by the tests and the benchmarks: the test MongoDB server, the service as a
live process, random files, the UI's browser. Not installed; the repository root is on sys.path
for pytest and ``python -m bench``. Test-only helpers (pytest rules) stay in tests/support."""
