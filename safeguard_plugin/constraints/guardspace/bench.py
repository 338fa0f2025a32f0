"""GuardSpace's rows in ``safeguard bench`` (read by :func:`safeguard_plugin.bench.runner.method_bench`)."""

BENCHMARK_ROWS = {"guardspace": {"null_energy": 0.01}}

# the adapters start from non-zero factors (BA != 0 at step 0: the safety-irrelevant SVD components), which other
# constraints' rows in the "all combined" run may need to know (CWAC's factor projection refuses such adapters)
NONZERO_ADAPTER_INIT = True
