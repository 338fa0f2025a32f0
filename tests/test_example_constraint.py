"""Issue 15, item 7: a constraint added by following docs/adding-a-constraint.md, with no edit outside its own files
and its entry point (tests/plugins/safeguard_l2_anchor*), is found by the registry, validated, trains, and is covered
by the tests that iterate the registry (DeepSpeed equivalence, fuzz, bench method list) without editing them."""

import subprocess
from pathlib import Path

import pytest

from safeguard_plugin import registry
from safeguard_plugin.config import ConfigError, load_config

from helpers import max_diff, train

ROOT = Path(__file__).resolve().parent.parent


def test_found_through_its_entry_point_like_a_third_party_package():
    from safeguard_l2_anchor import L2Anchor

    assert registry.available_constraints()["l2_anchor"] is L2Anchor
    assert load_config({"l2_anchor": {"pull": 0.5}}).section("l2_anchor").pull == 0.5
    with pytest.raises(ConfigError, match=r"l2_anchor\.pull"):
        load_config({"l2_anchor": {"pull": 0}})


def test_it_changes_training_and_logs_its_metric(tok, chat_rows, tmp_path):
    from safeguard_plugin.testing import tiny_model

    init = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    _, plain = train("plain", chat_rows, tok, tmp_path / "p")
    tr, anchored = train("callback", chat_rows, tok, tmp_path / "a", {"l2_anchor": {"pull": 1.0}})
    assert max_diff(plain, anchored) > 1e-4
    moved = {k: (plain[k] - init[k]).norm() for k in init}
    kept = {k: (anchored[k] - init[k]).norm() for k in init}
    assert sum(kept.values()) < 0.6 * sum(moved.values())  # pulled back towards the starting weights
    logged = [h["safeguard/l2_anchor_distance"] for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(v > 0 for v in logged)


def test_covered_by_the_registry_iterating_tests_without_editing_them():
    import ds_worker

    from safeguard_plugin.bench.runner import benchmark_methods

    assert "l2_anchor" in ds_worker.all_cases() and "l2_anchor" not in ds_worker.CASES  # defaults, no edit
    assert benchmark_methods()["l2_anchor"] == {"l2_anchor": {}}
    # no code or config outside its own files (and this test) names it; docs may point to it as the example
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    mentions = [f for f in files if not f.startswith("tests/plugins/") and not f.endswith(".md")
                and Path(f).name != "test_example_constraint.py"
                and (ROOT / f).is_file() and "l2_anchor" in (ROOT / f).read_text(errors="ignore")]
    assert not mentions, mentions
