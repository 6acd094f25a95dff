"""Fast one-process tests: one file per module where a file tests one module."""
