"""Tools for tests and benchmarks: counters of launches and memory traffic (``fastres.testing.counting``).
Nothing here is imported by the library itself."""
