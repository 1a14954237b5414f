"""Test helpers shared across the test packages (not tests themselves, except the harness's own)."""
