"""Issue 15, item 4: the configuration schema is visible to tools (built from the registry) and the docs' settings
tables are generated from the field descriptions; a stale table fails here."""

from safeguard_plugin import config_docs
from safeguard_plugin.config import SafeguardConfig, config_model
from safeguard_plugin.registry import available_constraints

BUILT_IN = ("procon", "monitor", "adaptive_kl", "cwac", "guardspace", "anchor")


def test_schema_types_every_registered_section():
    schema = SafeguardConfig.model_json_schema()
    registry = available_constraints()
    assert set(schema["properties"]) == {"artifact", "nan_policy", "strict_fingerprint", "check_first_steps", "preset",
                                         *registry}
    defs = schema["$defs"]
    for name, cls in registry.items():
        fields = defs[cls.config_class.__name__]["properties"]
        assert set(cls.config_class.model_fields) <= set(fields), name
    n = len(schema["properties"]) + sum(len(d.get("properties", {})) for d in defs.values())
    assert n > 60  # the whole configuration, not the 4 top-level keys of the dynamic model
    assert config_model()(procon={"weight": 3.0}).procon.weight == 3.0  # the typed model validates too


def test_docs_tables_are_generated_and_current():
    assert config_docs.main(["--check"]) == 0, "run `python -m safeguard_plugin.config_docs`"
    text = "\n".join(p.read_text() for p in config_docs.doc_files())
    for name in ("top", *BUILT_IN):
        assert f"<!-- config-table: {name} -->" in text, name  # every built-in section is documented


def test_a_stale_table_is_detected():
    stale = "x\n<!-- config-table: procon -->\n| key | default | meaning |\n| `procon.weight` | 1 | old |\n" \
            "<!-- /config-table -->\ny\n"
    fresh = config_docs.render(stale)
    assert fresh != stale and "| `procon.warmup_factor` | float | `10.0` |" in fresh
    assert config_docs.render(fresh) == fresh
