"""Issue 14, items 1, 2, 6, 7 and 20: the artifact writer never deletes a user's files, survives a kill at any point,
keeps every file inside its folder with checksums, reports every artifact problem as an ArtifactError naming the
file or field, and `safeguard calibrate` computes only what is asked, reusing what an artifact already holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safeguard_plugin import artifacts
from safeguard_plugin.artifacts import Artifact, ArtifactError, write_folder_atomic
from safeguard_plugin.cli import main
from safeguard_plugin.engine import SafeguardEngine
from safeguard_plugin.testing import tiny_model


@pytest.fixture()
def art_copy(artifact_dir, tmp_path):
    target = tmp_path / "art"
    shutil.copytree(artifact_dir, target)
    return target


def _rewrite_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _calibrate(out, *extra):
    return main(["calibrate", "--model", "tiny", "--out", str(out), "--limit", "24", "--batch-size", "8", *extra])


# ------------------------------------------------------------------------------------------------ 1. data loss
def test_calibrate_refuses_the_current_folder_and_keeps_its_files(tmp_path, monkeypatch, capsys):
    proj = tmp_path / "p"
    (proj / "src").mkdir(parents=True)
    (proj / "src/main.py").write_text("code")
    monkeypatch.chdir(proj)
    assert _calibrate(".") == 2
    err = capsys.readouterr().err
    assert "refusing to write the artifact to" in err and "the current folder" in err
    assert (proj / "src/main.py").read_text() == "code"
    assert sorted(p.name for p in proj.iterdir()) == ["src"]
    (proj / "sub").mkdir()
    monkeypatch.chdir(proj / "sub")
    assert _calibrate("..") == 2 and "a folder holding the current folder" in capsys.readouterr().err


def test_calibrate_refuses_home_root_files_and_foreign_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home/.bashrc").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert _calibrate(str(tmp_path / "home")) == 2 and "your home folder" in capsys.readouterr().err
    assert _calibrate("/") == 2 and "the filesystem root" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("keep: me\n")
    assert _calibrate("config.yaml") == 2
    assert "a file with that name exists" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "keep: me\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".config.yaml")]
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text("{}")
    assert _calibrate("data") == 2
    err = capsys.readouterr().err
    assert "is not a safeguard artifact" in err and "train.jsonl" in err
    assert (tmp_path / "data/train.jsonl").read_text() == "{}"
    assert (tmp_path / "home/.bashrc").read_text() == "x"


def test_an_artifact_folder_holding_other_files_is_not_replaced(art_copy, tok):
    (art_copy / "notes.txt").write_text("mine")
    art = Artifact.load(art_copy)
    with pytest.raises(ArtifactError, match=r"also holds files the artifact does not list \(notes.txt\)"):
        art.save(art_copy)
    assert (art_copy / "notes.txt").read_text() == "mine"
    (art_copy / "notes.txt").unlink()
    art.save(art_copy)  # an artifact and nothing else: replaced (atomically)
    assert Artifact.load(art_copy).has("refusal_direction")
    empty = art_copy.parent / "empty"
    empty.mkdir()
    art.save(empty)  # an empty folder is fine
    assert Artifact.load(empty).has("refusal_direction")


# ------------------------------------------------------------------------------------------ 2. killed writes
KILLER = textwrap.dedent("""
    import os, signal, sys
    import shutil
    from safeguard_plugin import artifacts
    from safeguard_plugin.artifacts import Artifact
    target, point = sys.argv[1], sys.argv[2]
    art = Artifact.load(target)
    art.manifest["marker"] = "new"
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "during_write":
        real = artifacts._write_component
        def write(tensors, name, path):
            real(tensors, name, path)
            die()
        artifacts._write_component = write
    elif point in ("after_first_rename", "after_second_rename"):
        real_replace = os.replace
        calls = []
        def replace(a, b):
            real_replace(a, b)
            calls.append(1)
            if (point == "after_first_rename" and len(calls) == 1) or len(calls) == 2:
                die()
        artifacts.os.replace = replace
    art.save(target)
    print("not killed")
""")


@pytest.mark.parametrize("point,expect", [("during_write", None), ("after_first_rename", None),
                                          ("after_second_rename", "new")])
def test_a_write_killed_at_each_point_is_repaired(art_copy, tmp_path, point, expect):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(art_copy), point], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    left = sorted(p.name for p in art_copy.parent.iterdir() if p.name.startswith(".art."))
    assert left, "the kill should have left a temp or old folder behind"
    if point == "after_first_rename":
        assert not art_copy.exists()  # the state the issue describes: the name is missing, the old copy hidden
    art = Artifact.load(art_copy)  # the next load repairs
    assert art.manifest.get("marker") == expect and art.has("refusal_direction")
    art.manifest["marker"] = "again"
    art.save(art_copy)  # and the next write cleans up
    assert sorted(p.name for p in art_copy.parent.iterdir() if p.name != "killer.py") == ["art"]
    assert Artifact.load(art_copy).manifest["marker"] == "again"


def test_a_live_writers_temp_folder_is_left_alone(art_copy):
    other = art_copy.parent / f".art.tmp-{artifacts._host()}-{os.getpid()}-abcd"  # a write in progress (this pid)
    other.mkdir()
    Artifact.load(art_copy).save(art_copy)
    assert other.is_dir()


# ------------------------------------------------------------------------------------- 6. files stay inside
@pytest.mark.parametrize("bad", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_component_files_outside_the_folder_are_refused(art_copy, bad):
    outside = art_copy.parent / "outside.safetensors"
    save_file({"direction": torch.zeros(3)}, str(outside))

    def edit(m):
        m["components"]["refusal_direction"]["file"] = bad
    _rewrite_manifest(art_copy, edit)
    with pytest.raises(ArtifactError, match="is not a relative path inside the artifact folder"):
        Artifact.load(art_copy)


def test_symlinked_component_leaving_the_folder_is_refused(art_copy):
    outside = art_copy.parent / "elsewhere.safetensors"
    shutil.copy(art_copy / "refusal_direction.safetensors", outside)
    (art_copy / "refusal_direction.safetensors").unlink()
    (art_copy / "refusal_direction.safetensors").symlink_to(outside)
    with pytest.raises(ArtifactError, match="leads outside the artifact folder"):
        Artifact.load(art_copy)


def test_component_names_cannot_escape_on_save(art_copy, tmp_path):
    def edit(m):
        m["components"]["../../escaped"] = m["components"].pop("risk_probe")
    _rewrite_manifest(art_copy, edit)
    with pytest.raises(ArtifactError, match="component name '../../escaped' is not allowed"):
        Artifact.load(art_copy)
    art = Artifact.new(tiny_model(), _tok(), "tiny")
    with pytest.raises(ArtifactError, match="is not allowed"):
        art.add_component("../../escaped", {"x": torch.ones(2)}, {})
    art.tensors["../../escaped"] = {"x": torch.ones(2)}  # forced past add_component
    art.manifest["components"]["../../escaped"] = {"file": "x"}
    with pytest.raises(ArtifactError, match="is not allowed"):
        art.save(tmp_path / "out" / "a")
    assert not (tmp_path / "escaped.safetensors").exists() and not (tmp_path / "out").exists()
    with pytest.raises(ArtifactError, match="not a relative path"):
        write_folder_atomic(tmp_path / "w", {"../evil": b"x"})
    assert not (tmp_path / "evil").exists()


def _tok():
    from safeguard_plugin.testing import tiny_tokenizer

    return tiny_tokenizer()


def test_sha256_recorded_and_checked(art_copy):
    m = json.loads((art_copy / "manifest.json").read_text())
    assert all(len(c["sha256"]) == 64 for c in m["components"].values())
    f = art_copy / "refusal_direction.safetensors"
    t = Artifact.load(art_copy).tensors["refusal_direction"]
    t["direction"] = torch.zeros_like(t["direction"])  # a valid safetensors file, other values: a swapped file
    save_file(t, str(f))
    with pytest.raises(ArtifactError, match=r"refusal_direction.safetensors does not match its sha256"):
        Artifact.load(art_copy)


# ----------------------------------------------------------------------------- 7. every problem an ArtifactError
def test_truncated_tensor_file_names_the_file(art_copy, capsys):
    f = art_copy / "refusal_direction.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        Artifact.load(art_copy)

    def edit(m):
        del m["components"]["refusal_direction"]["sha256"]  # an artifact from before checksums
    _rewrite_manifest(art_copy, edit)
    with pytest.raises(ArtifactError, match=r"refusal_direction.safetensors cannot be read .*truncated or corrupt"):
        Artifact.load(art_copy)
    assert main(["inspect", str(art_copy)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("selected_layers", [1, 7], r"'selected_layers' is \[1, 7\]; it must list layer indices in 0..3"),
    ("selected_layers", [], r"'selected_layers' is \[\]"),
    ("num_layers", 2, "field 'num_layers' is 2 but the direction tensor has 4"),
    ("selected_position", 99, "'selected_position' is 99"),
    ("hidden_size", "64", "field 'hidden_size' is '64'"),
])
def test_manifest_fields_that_disagree_with_the_tensors(art_copy, field, value, message, capsys, tok):
    def edit(m):
        m["components"]["refusal_direction"][field] = value
    _rewrite_manifest(art_copy, edit)
    with pytest.raises(ArtifactError, match=message):
        Artifact.load(art_copy)
    assert main(["inspect", str(art_copy)]) == 2  # found by inspect ...
    assert "re-run `safeguard calibrate`" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match=message):  # ... and before step 1
        SafeguardEngine({"artifact": str(art_copy), "procon": {}}).setup(tiny_model(), tok)


@pytest.mark.parametrize("value", [float("nan"), 0.0])
def test_nan_or_zero_direction_is_refused(art_copy, value):
    art = Artifact.load(art_copy)
    t = art.tensors["refusal_direction"]
    t["direction"] = torch.full_like(t["direction"], value)
    art.save(art_copy)  # written with a fresh (matching) checksum: only the values are wrong
    match = "holds NaN or inf" if value != value else "has norm 0 instead of 1"
    with pytest.raises(ArtifactError, match=match):
        Artifact.load(art_copy)


@pytest.mark.parametrize("drop", ["model", "tokenizer", "components"])
def test_missing_manifest_fields(art_copy, drop):
    _rewrite_manifest(art_copy, lambda m: m.pop(drop))
    with pytest.raises(ArtifactError, match=f"field '{drop}' is missing"):
        Artifact.load(art_copy)


def test_layer_count_checked_even_without_strict_fingerprint(artifact_dir, tok):
    with pytest.raises(ArtifactError, match="has 4 layers of size 64, the model 3 layers"):
        SafeguardEngine({"artifact": str(artifact_dir), "strict_fingerprint": False, "procon": {}}).setup(
            tiny_model(layers=3), tok)


# -------------------------------------------------------------------------- 20. calibrate what is used
def test_calibrate_computes_only_what_is_named_and_reuses_the_rest(tmp_path, monkeypatch, caplog, capsys):
    from safeguard_plugin import calibration

    calls = []
    real = calibration.post_instruction_activations

    def counted(ctx, prompts, desc):
        calls.append(desc)
        return real(ctx, prompts, desc)

    monkeypatch.setattr(calibration, "post_instruction_activations", counted)
    out = tmp_path / "a"
    with caplog.at_level(logging.INFO, logger="safeguard_plugin"):
        assert _calibrate(out) == 0
    assert "calibrating the refusal direction" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["components"]) == ["refusal_direction"] and m["calibrated_for"] == ["procon"]
    assert len(calls) == 4
    plan = [r.getMessage() for r in caplog.records if "calibration plan" in r.getMessage()]
    assert plan and "compute procon on 48 prompts" in plan[0] and " s per batch of 8" in plan[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="safeguard_plugin"):
        assert _calibrate(out, "--constraints", "procon,guardspace") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["components"]) == {"refusal_direction", "guardspace"} and m["calibrated_for"] == ["procon", "guardspace"]
    assert len(calls) == 4  # the refusal direction was reused, not recomputed
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "reusing procon" in text and "compute guardspace" in text and "SVD per Linear layer" in text

    assert _calibrate(out, "--constraints", "procon") == 0 and len(calls) == 4  # nothing to do
    assert _calibrate(out, "--constraints", "procon", "--recompute") == 0 and len(calls) == 8
    assert list(json.loads((out / "manifest.json").read_text())["components"]) == ["refusal_direction"]


def test_calibrate_refuses_to_extend_an_artifact_of_other_prompts_or_model(tmp_path, capsys):
    out = tmp_path / "a"
    assert _calibrate(out) == 0
    assert main(["calibrate", "--model", "tiny", "--out", str(out), "--limit", "16", "--batch-size", "8",
                 "--constraints", "guardspace"]) == 2
    assert "was calibrated on other prompts" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    m["model"]["fingerprint"]["structure"]["hidden_size"] = 32
    (out / "manifest.json").write_text(json.dumps(m))
    assert _calibrate(out, "--constraints", "guardspace") == 2
    assert "holds an artifact for another model" in capsys.readouterr().err
    assert _calibrate(out, "--constraints", "procon", "--recompute") == 0  # an artifact folder: may be replaced
