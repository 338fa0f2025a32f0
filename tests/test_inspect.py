"""`safeguard inspect DIR`: a short summary by default, the full tensor list only with --tensors."""

import json

import torch

from safeguard_plugin.artifacts import Artifact
from safeguard_plugin.cli import main

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _check_short(text: str) -> list[str]:
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines:\n{text}"
    assert max(map(len, lines)) <= 200, max(lines, key=len)
    return lines


def test_inspect_summary_of_full_artifact(artifact_dir, capsys):
    assert main(["inspect", str(artifact_dir)]) == 0
    out = capsys.readouterr().out
    lines = _check_short(out)
    art = Artifact.load(artifact_dir)
    m = art.manifest
    assert m["model"]["fingerprint"]["id"] in out
    for d in m["data"].values():  # calibration data hashes, in full
        assert d["sha256"] in out
    n_all = sum(len(t) for t in art.tensors.values())
    assert f"components: {len(m['components'])}, {n_all} tensors" in out
    for name, tensors in art.tensors.items():  # one line per component: its tensor count and size
        assert any(line.startswith(f"  {name}: {len(tensors)} tensors, ") for line in lines), name
    assert "refusal_direction: 6 tensors" in out and "layers " in out
    sel = m["components"]["refusal_direction"]["selected_layers"]
    assert f"layers {sel[0]}-{sel[-1]}" in out or f"layers {sel[0]}" in out
    assert "--tensors" in lines[-1]
    assert "0.mlp.down_proj.U" not in out  # no tensor names by default

    assert main(["inspect", str(artifact_dir), "--tensors"]) == 0
    full = capsys.readouterr().out
    assert full.startswith(out.rsplit("\n", 2)[0])  # the same summary first
    assert "  guardspace/0.mlp.down_proj.U [" in full
    assert len(full.splitlines()) > n_all

    assert main(["inspect", str(artifact_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]


def test_inspect_summary_of_large_synthetic_artifact(tmp_path, capsys):
    """~200 GuardSpace-like per-layer tensors plus long meta: the summary stays short."""
    tensors = {f"{layer}.{mod}.{part}": torch.zeros(8, 4) for layer in range(10) for mod in MODULES
               for part in ("U", "S", "V")}
    manifest = {"format_version": 1, "package_version": "0", "created": "now",
                "model": {"id": "synthetic/" + "m" * 150, "fingerprint": {"id": "abc123", "structure": {}}},
                "tokenizer": {"hash": "t"},
                "data": {"harmful": {"source": "h" * 300, "sha256": "0" * 64, "n_train": 1, "n_heldout": 1}},
                "components": {"guardspace": {"file": "guardspace.safetensors", "method": "x" * 500,
                                              "null_dims_summary": "y" * 900, "num_layers": 10,
                                              **{f"k{i}": i for i in range(60)}}}}
    art = Artifact(manifest, {"guardspace": tensors}, path=tmp_path)
    assert len(tensors) == 210
    lines = _check_short(art.summary())
    assert "  guardspace: 210 tensors, 26.2 KiB, layers 0-9" in lines
    full = art.summary(tensors=True).splitlines()
    assert len(full) == len(lines) - 1 + 1 + 210  # the hint line replaced by 'tensors:' + one line per tensor
