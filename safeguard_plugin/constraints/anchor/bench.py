"""The anchor's row in ``safeguard bench`` (read by :func:`safeguard_plugin.bench.runner.method_bench`)."""

BENCHMARK_ROWS = {"anchor": {}}
