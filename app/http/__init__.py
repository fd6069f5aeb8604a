"""HTTP mechanics (RFC 9110) that know nothing about the application.

Nothing here imports application state (app keys, metrics, clock, storage,
registry); tests/test_imports.py checks that. The application side hands in
what it knows: headers, sizes, readers, limits and hooks.
"""
