import json

import pytest
import torch

from safeguard_plugin.artifacts import Artifact, ArtifactError
from safeguard_plugin.engine import SafeguardEngine
from safeguard_plugin.testing import tiny_model


def test_roundtrip_and_manifest(artifact_dir):
    art = Artifact.load(artifact_dir)
    m = art.manifest
    assert m["format_version"] == 1 and m["package_version"]
    assert m["model"]["fingerprint"]["structure"]["num_hidden_layers"] == 4
    assert m["data"]["harmful"]["sha256"] and m["data"]["harmful"]["n_train"] > 0
    assert m["tokenizer"]["hash"] and m["tokenizer"]["post_instruction_ids"]
    comp = m["components"]["refusal_direction"]
    t = art.tensors["refusal_direction"]
    assert t["direction"].shape == (4, comp["num_positions"], 64)
    assert torch.allclose(t["direction"].norm(dim=-1), torch.ones(4, comp["num_positions"]), atol=1e-5)
    assert comp["selected_layers"] and max(comp["selected_layers"]) < 4 and 0 not in comp["selected_layers"]
    assert "selection_rule" in comp and "refusal_direction" in art.summary()
    assert not list(artifact_dir.parent.glob(".*tmp*"))
    assert not any(p.suffix == ".pt" or p.suffix == ".bin" for p in artifact_dir.iterdir())


def test_fingerprint_rejects_other_model_accepts_bf16_copy(artifact_dir, tok):
    with pytest.raises(ArtifactError, match="calibrated on 'tiny', not on this model"):
        SafeguardEngine({"artifact": str(artifact_dir), "procon": {}}).setup(tiny_model(seed=1), tok)
    with pytest.raises(ArtifactError, match="config.num_hidden_layers"):
        SafeguardEngine({"artifact": str(artifact_dir), "procon": {}}).setup(tiny_model(layers=3), tok)
    SafeguardEngine({"artifact": str(artifact_dir), "procon": {}}).setup(tiny_model().to(torch.bfloat16), tok)
    with pytest.warns(UserWarning, match="differ"):
        SafeguardEngine({"artifact": str(artifact_dir), "strict_fingerprint": False, "procon": {}}).setup(
            tiny_model(seed=1), tok)


def test_missing_layer_and_dimension_errors_before_training(artifact_dir, tok):
    with pytest.raises(ValueError, match=r"procon.layers: \[7\] out of range"):
        SafeguardEngine({"artifact": str(artifact_dir), "procon": {"layers": [1, 7]}}).setup(tiny_model(), tok)
    art = Artifact.load(artifact_dir)
    art.tensors["refusal_direction"]["direction"] = torch.zeros(4, art.manifest["components"]["refusal_direction"]["num_positions"], 32)
    with pytest.raises(ValueError, match="dimension 32"):
        SafeguardEngine({"procon": {}}, artifact=art).setup(tiny_model(), tok)


def test_missing_component_and_corrupt_files(artifact_dir, tmp_path):
    art = Artifact.load(artifact_dir)
    with pytest.raises(ArtifactError, match="no 'sae' component"):
        art.component("sae")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Artifact.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        Artifact.load(bad)
    (bad / "manifest.json").write_text(json.dumps({**art.manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99"):
        Artifact.load(bad)


def test_interrupted_write_keeps_previous_artifact(artifact_dir, tmp_path, monkeypatch):
    import shutil

    from safeguard_plugin import artifacts

    target = tmp_path / "art"
    shutil.copytree(artifact_dir, target)
    before = (target / "manifest.json").read_text()
    art = Artifact.load(target)
    art.add_component("extra", {"x": torch.ones(3)}, {"note": "new"})

    def boom(tensors, path, metadata=None):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(artifacts, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        art.save(target)
    assert (target / "manifest.json").read_text() == before
    assert Artifact.load(target).has("refusal_direction")
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp folder left behind
