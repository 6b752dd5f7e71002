"""Test-only helpers: reference implementations and toy models. Never imported by the library itself."""
