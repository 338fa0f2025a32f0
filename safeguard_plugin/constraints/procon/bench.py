"""ProCon's row in ``safeguard bench`` (read by :func:`safeguard_plugin.bench.runner.method_bench`)."""

BENCHMARK_ROWS = {"procon": {"weight": 100.0, "warmup_ratio": 0.1, "warmup_factor": 10.0}}
