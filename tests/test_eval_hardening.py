"""``safeguard eval`` hardening (issue 14, items 10-13): a wrong adapter path, an --out that is a file, user files
evaluated whole with n shown, unique set names, and file errors that name the file and the 1-based line."""

import json

import pytest
import torch

from safeguard_plugin.cli import main
from safeguard_plugin.data import load_prompts


def _jsonl(path, n, key="prompt"):
    path.write_text("\n".join(json.dumps({key: f"user prompt number {i}"}) for i in range(n)) + "\n")
    return path


def _eval(tmp_path, *extra, out="ev"):
    return main(["eval", "--model", "tiny", "--max-new-tokens", "2", "--out", str(tmp_path / out), *extra])


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model would be loaded (errors must come before any loading or generation)."""
    import safeguard_plugin.modeling as modeling

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error was reported")

    monkeypatch.setattr(modeling, "load_model_spec", boom)


# ------------------------------------------------------------------------------------------------ item 10
def test_missing_adapter_fails_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nonexistent-adapter"
    assert _eval(tmp_path, "--adapter", str(missing), "--prompts", "harmful", "--limit", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("safeguard eval: error:") and str(missing) in err and "not found" in err
    assert not (tmp_path / "ev").exists()


def test_adapter_folder_without_adapter_config_fails(tmp_path, capsys):
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    assert _eval(tmp_path, "--adapter", str(folder), "--prompts", "harmful", "--limit", "1") == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "adapter_config.json" in err


def test_adapter_is_applied_to_the_tiny_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    from safeguard_plugin.modeling import is_peft_model, load_model_spec
    from safeguard_plugin.testing import tiny_model

    peft = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    base, tok = load_model_spec("tiny")
    adapted, _ = load_model_spec("tiny", adapter=str(tmp_path / "adapter"))
    assert is_peft_model(adapted)
    ids = tok("How do I bake bread?", return_tensors="pt")["input_ids"].to(next(base.parameters()).device)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, adapted(ids).logits)


# ------------------------------------------------------------------------------------------------ item 11
def test_out_existing_file_fails_before_loading(tmp_path, capsys, no_model):
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    assert main(["eval", "--model", "tiny", "--prompts", "harmful", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safeguard eval: error:") and str(out) in err and "folder" in err
    assert out.read_text() == "keep me"


def test_out_under_a_file_fails_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "f").write_text("x")
    assert main(["eval", "--model", "tiny", "--prompts", "harmful", "--out", str(tmp_path / "f" / "sub")]) == 2
    assert str(tmp_path / "f") in capsys.readouterr().err


def test_write_report_refuses_a_file_with_a_clear_error(tmp_path):
    from safeguard_plugin.eval import write_report

    (tmp_path / "x").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        write_report({}, tmp_path / "x")


# ------------------------------------------------------------------------------------------------ item 12
def test_user_file_is_evaluated_whole_and_table_shows_n(tmp_path, capsys):
    f = _jsonl(tmp_path / "mine.jsonl", 10)
    assert _eval(tmp_path, "--prompts", str(f)) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["mine"]["n"] == 10
    printed = capsys.readouterr().out
    assert "mine n" in printed and "| 10 |" in printed
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "mine n" in md and "| 10 |" in md


def test_explicit_split_applies_to_user_files(tmp_path):
    f = _jsonl(tmp_path / "mine.jsonl", 10)
    assert _eval(tmp_path, "--prompts", str(f), "--split", "heldout") == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["mine"]["n"] == 3


def test_shipped_sets_keep_the_heldout_default(tmp_path, monkeypatch):
    import safeguard_plugin.eval as ev

    seen = {}

    def fake(model, tok, sets, *a, **k):
        seen.update({k2: list(v) for k2, v in sets.items()})
        return {k2: {"n": len(v), "refusal_rate": 0.0, "refusal_score": 0.0, "samples": []} for k2, v in sets.items()}

    monkeypatch.setattr(ev, "evaluate_refusal", fake)
    f = _jsonl(tmp_path / "mine.jsonl", 10)
    assert _eval(tmp_path, "--prompts", "harmful", str(f)) == 0
    assert seen["harmful"] == load_prompts("harmful").heldout and len(seen["mine"]) == 10


def test_single_prompt_user_file_is_evaluated(tmp_path):
    f = _jsonl(tmp_path / "one.jsonl", 1)
    assert _eval(tmp_path, "--prompts", str(f)) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["one"]["n"] == 1


# ------------------------------------------------------------------------------------------------ item 13
def test_file_named_like_a_shipped_set_does_not_replace_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "harmful.jsonl", 4)
    assert _eval(tmp_path, "--prompts", "harmful", "harmful.jsonl", "--limit", "2") == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report) == {"harmful", "harmful.jsonl"}
    assert report["harmful.jsonl"]["samples"][0]["prompt"] == "user prompt number 0"
    assert report["harmful"]["samples"][0]["prompt"] in load_prompts("harmful").heldout
    assert report["harmful.jsonl"]["source"] == "harmful.jsonl" and report["harmful"]["split"] == "heldout"


def test_two_files_with_the_same_stem_get_distinct_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _jsonl(tmp_path / "a" / "p.jsonl", 2), _jsonl(tmp_path / "b" / "p.jsonl", 3)
    assert _eval(tmp_path, "--prompts", str(a), str(b)) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {report[str(a)]["n"], report[str(b)]["n"]} == {2, 3}


def test_same_set_twice_is_refused(tmp_path, capsys, no_model):
    f = _jsonl(tmp_path / "p.jsonl", 3)
    assert _eval(tmp_path, "--prompts", str(f), str(f)) == 2
    err = capsys.readouterr().err
    assert "given twice" in err and str(f) in err
    assert _eval(tmp_path, "--prompts", "harmful", "harmful") == 2
    assert "'harmful'" in capsys.readouterr().err


def test_help_documents_set_names_and_split(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "file name" in text and "evaluated whole" in text


def test_non_utf8_file_names_file_and_line(tmp_path, capsys, no_model):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "ok one"}\n\n{"prompt": "caf\xe9"}\n{"prompt": "ok two"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl line 3: not UTF-8"):
        load_prompts(str(f))
    assert _eval(tmp_path, "--prompts", str(f)) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "line 3" in err and "UTF-8" in err


def test_non_utf8_csv_names_file_and_line(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes(b"prompt\nfirst\nsecond\nth\xefrd\n")
    with pytest.raises(ValueError, match=r"p\.csv line 4: not UTF-8"):
        load_prompts(str(f))


def test_bad_jsonl_line_names_file_and_real_line(tmp_path, capsys, no_model):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",}\n{"prompt": "d"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 4: not valid JSON"):
        load_prompts(str(f))
    assert _eval(tmp_path, "--prompts", str(f)) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "line 4" in err and "Traceback" not in err


def test_row_without_prompt_names_file_and_line(tmp_path):
    f = tmp_path / "cols.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"answer": "c"}\n')
    with pytest.raises(ValueError, match=r"cols\.jsonl line 3: no prompt column"):
        load_prompts(str(f))


def test_bad_json_file_names_file_and_line(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('[\n  "a",\n  "b"\n  "c"\n]\n')
    with pytest.raises(ValueError, match=r"p\.json line 4: not valid JSON"):
        load_prompts(str(f))


def test_missing_prompt_file_is_named(tmp_path, capsys, no_model):
    assert _eval(tmp_path, "--prompts", str(tmp_path / "nope.jsonl")) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope.jsonl") in err and "not found" in err


def test_adapter_missing_its_weights_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from safeguard_plugin.modeling import load_model_spec
    from safeguard_plugin.testing import tiny_model

    d = tmp_path / "adapter"
    get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(d)
    weights = load_file(d / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "v_proj" not in k}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lacks adapter weights .*v_proj"):
        load_model_spec("tiny", adapter=str(d))


def test_zero_limit_is_refused(tmp_path, capsys, no_model):
    with pytest.raises(SystemExit) as exc:
        _eval(tmp_path, "--prompts", "harmful", "--limit", "0")
    assert exc.value.code == 2 and "--limit: must be a positive integer" in capsys.readouterr().err


def test_empty_split_of_a_user_file_is_refused(tmp_path, capsys, no_model):
    f = tmp_path / "split.jsonl"
    f.write_text('{"prompt": "a", "split": "train"}\n{"prompt": "b", "split": "train"}\n')
    assert _eval(tmp_path, "--prompts", str(f), "--split", "heldout") == 2
    assert "no prompts in its 'heldout' split" in capsys.readouterr().err
