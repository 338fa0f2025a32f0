"""Adaptive KL's rows in ``safeguard bench`` (read by :func:`safeguard_plugin.bench.runner.method_bench`).

judge: the model being fine-tuned, adapters disabled (the reference policy), rates the examples: offline. The built-in
0.5B model fails the judge check (it rates harmful requests 1, arithmetic 5): the row runs it anyway, to show what a
judge that was not validated does to training.
"""

BENCHMARK_ROWS = {
    "adaptive_kl_probe": {"risk": "probe"},
    "adaptive_kl_keyword": {"risk": "keyword"},
    "adaptive_kl_judge": {"risk": "judge", "risk_options": {"model": "reference", "validate_judge": False}},
}
