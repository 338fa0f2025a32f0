"""The monitor has no row of its own in ``safeguard bench``: the bench runs it alongside every method (measure only),
for the safety-during-training curves (read by :func:`safeguard_plugin.bench.runner.method_bench`)."""

BENCHMARK_ROWS: dict[str, dict] = {}
