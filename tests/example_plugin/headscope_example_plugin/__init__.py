"""An example third-party headscope extension (tests/test_registries.py)."""
