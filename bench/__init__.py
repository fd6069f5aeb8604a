"""Load tests for large transfers (see the bench issue); measured, never asserted in unit tests."""
