"""CWAC's rows in ``safeguard bench`` (read by :func:`safeguard_plugin.bench.runner.method_bench`)."""

from __future__ import annotations

from typing import Any

# the coupled row first: "all combined" in the benchmark takes each constraint's first row
BENCHMARK_ROWS = {"cwac": {}, "cwac_weight": {"sae_weight": 0.0}, "cwac_sae": {"projection": False}}


def combined(config: dict, others: dict[str, Any]) -> dict:
    """CWAC's section in the "all combined" row, given the other methods' bench data (``{name: MethodBench}``)."""
    if any(o.nonzero_adapter_init for o in others.values()):
        # the factor projection refuses adapters that start non-zero: keep the SAE term, and leave the update
        # restriction to the constraint that built those adapters (GuardSpace's null-space projector)
        return {**config, "projection": False}
    return config
