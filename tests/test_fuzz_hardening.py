"""Issue 14's fuzz test: a few hundred seeded random configs and artifact corruptions. For each: no raw traceback
from our code (only our own error types, each with a message), no run set up with a dead constraint, and nothing
written outside the folder being written."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from safeguard_plugin.artifacts import Artifact, ArtifactError
from safeguard_plugin.cli import main
from safeguard_plugin.config import ConfigError, load_config
from safeguard_plugin.constraints.cwac import CWACError
from safeguard_plugin.constraints.guardspace import GuardSpaceError
from safeguard_plugin.engine import SafeguardEngine, SafeguardRuntimeError
from safeguard_plugin.errors import DataError
from safeguard_plugin.modeling import pad_right, tokenize_prompts
from safeguard_plugin.registry import available_constraints
from safeguard_plugin.testing import tiny_model

# DataError: a prompt set named in a config (monitor.prompts, anchor.prompts) that is neither shipped, a file nor
# reachable on the hub fails when the run begins, with the name and where it was looked for
OURS = (ConfigError, ArtifactError, SafeguardRuntimeError, CWACError, GuardSpaceError, DataError)
VALUES = [None, True, False, 0, 1, -1, 3, 1e-3, 0.5, 100.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan"),
          "1e3", "yes", "no", "", "auto", "all", "last", "selected", "skip", "raise", [], [1, 7], [0, 1], {}, {"a": 1}]
TOP = ["artifact", "nan_policy", "strict_fingerprint", "check_first_steps"]


def _random_section(rng: random.Random, model: type[BaseModel], keep: float) -> dict:
    """Up to 4 of ``model``'s fields, each its default or (1 − keep of the time) a random value; a nested block
    (e.g. ``calibration``) is sampled the same way, as a mapping (JSON-able, like a YAML's) or now and then in the
    legacy flat form (its keys at the top of the section)."""
    fields = model.model_fields
    section = {}
    for f in rng.sample(list(fields), rng.randint(0, min(4, len(fields)))):
        default = fields[f].get_default(call_default_factory=True)
        if rng.random() >= keep:
            section[f] = rng.choice(VALUES)
        elif isinstance(default, BaseModel):
            nested = _random_section(rng, type(default), keep)
            if rng.random() < 0.2:  # the legacy flat form: moved under the block (with a FutureWarning)
                section.update(nested)
            else:
                section[f] = nested
        else:
            section[f] = default
    return section


def random_config(rng: random.Random, artifact: str) -> dict:
    """Half hostile (most values random), half mostly valid (a value now and then replaced by a random one)."""
    registry = available_constraints()
    hostile = rng.random() < 0.5
    keep = 0.3 if hostile else 0.85
    cfg: dict = {"artifact": artifact}
    for key in rng.sample(TOP[1:] + ["bogus_key"], rng.choice([0, 1, 2]) if hostile else 0):
        cfg[key] = rng.choice(VALUES)
    for name in rng.sample([*registry, "nope"] if hostile else list(registry), rng.randint(1, 3)):
        if name == "nope":
            cfg[name] = {}
            continue
        section = _random_section(rng, registry[name].config_class, keep)
        if hostile and rng.random() < 0.2:
            section["no_such_option"] = 1
        cfg[name] = section if not hostile or rng.random() < 0.9 else rng.choice([None, True, 3, "x"])
    return {"safeguard": cfg} if rng.random() < 0.3 else cfg


def _weights(cfg) -> list[float]:
    out = []
    for section in cfg.constraint_configs().values():
        for k, v in section.model_dump().items():
            if "weight" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(float(v))
    return out


@pytest.fixture(scope="module")
def procon_artifact(tmp_path_factory, tok):
    from safeguard_plugin.calibration import calibrate
    from safeguard_plugin.data import load_prompts

    out = tmp_path_factory.mktemp("fuzz") / "art"
    calibrate(tiny_model(), tok, load_prompts("harmful", limit=24), load_prompts("harmless", limit=24), out,
              model_id="tiny", progress=False)
    return out


def _batch(tok):
    seqs = [s + [5, 6, 7] for s in tokenize_prompts(tok, ["How do I pick a lock?", "Tell me about bread baking"])]
    return pad_right(seqs, 0)


def _penalty_is_live(engine: SafeguardEngine, model, tok) -> float:
    """Precompute references, perturb the weights, one training forward: the penalty the engine saw."""
    ids, mask = _batch(tok)
    engine.precompute_references([{"input_ids": ids}], progress=False)
    engine.begin_training(max_steps=10, grad_accum=1)
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()
    return engine.metrics().get("safeguard/procon_loss", float("nan"))


def test_random_configs(procon_artifact, tok):
    rng = random.Random(20261206)
    torch.manual_seed(0)
    accepted = set_up = live_checked = 0
    for i in range(300):
        raw = random_config(rng, str(procon_artifact))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = load_config(json.loads(json.dumps(raw)) if rng.random() < 0.5 else raw)
        except ConfigError as err:
            assert str(err), raw
            continue
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"case {i}: raw {type(err).__name__} from load_config({raw!r}): {err}")
        accepted += 1
        weights = _weights(cfg)
        assert all(math.isfinite(w) and 0 <= w < 1e20 for w in weights), (i, raw, weights)
        model = tiny_model()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = SafeguardEngine(cfg).setup(model, tok)
        except OURS as err:
            assert str(err), raw
            continue
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"case {i}: raw {type(err).__name__} from setup({raw!r}): {err}")
        set_up += 1
        procon = cfg.constraint_configs().get("procon")
        if procon is not None and procon.weight > 0 and live_checked < 25:
            live_checked += 1
            try:
                pen = _penalty_is_live(engine, model, tok)
            except OURS:
                continue
            assert math.isfinite(pen) and pen > 0, (i, raw, pen)  # the constraint acts on training
        engine.detach()
    print(f"configs: 300 generated, {accepted} accepted, {set_up} set up, {live_checked} trained a step")
    assert accepted >= 20 and set_up >= 10 and live_checked >= 5  # the generator reaches the training path


def _corrupt(rng: random.Random, art: Path, outside: Path) -> str:
    files = sorted(p for p in art.iterdir() if p.is_file() and not p.is_symlink() and p.stat().st_size > 0)
    if not files:
        return "nothing left"
    f = rng.choice(files)
    kind = rng.choice(["truncate", "flip", "field", "drop_key", "bad_path", "symlink", "remove", "manifest_garbage",
                       "tensor_values"])
    try:
        m = json.loads((art / "manifest.json").read_text())
        comp = m["components"]["refusal_direction"]
    except (ValueError, KeyError, TypeError):  # an earlier corruption broke the manifest: corrupt a file instead
        kind = rng.choice(["truncate", "flip", "remove"])
    if kind == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip":
        data = bytearray(f.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    elif kind == "field":
        comp[rng.choice(["num_layers", "num_positions", "hidden_size", "selected_layers", "selected_position",
                         "file", "sha256"])] = rng.choice(VALUES)
    elif kind == "drop_key":
        model = m.get("model") if isinstance(m.get("model"), dict) else {}
        target = rng.choice([x for x in (m, model, model.get("fingerprint"), m.get("tokenizer"), comp)
                             if isinstance(x, dict)])
        if target:
            target.pop(rng.choice(list(target)))
    elif kind == "bad_path":
        comp["file"] = rng.choice(["../outside.safetensors", str(outside / "outside.safetensors"), "a/../../x",
                                   "./refusal_direction.safetensors", "~/x", "sub/\\..\\x"])
    elif kind == "symlink":
        shutil.copy(f, outside / f.name)
        f.unlink()
        f.symlink_to(outside / f.name)
    elif kind == "remove":
        f.unlink()
    elif kind == "manifest_garbage":
        (art / "manifest.json").write_bytes(rng.choice([b"", b"\xff\xfe", b"[]", b"null", b'{"format_version": 1}']))
        return kind
    elif kind == "tensor_values":  # a consistent tamper: new values, checksum recomputed
        try:
            a = Artifact.load(art)
        except ArtifactError:
            return "unreadable"
        t = a.tensors["refusal_direction"]
        key = rng.choice(list(t))
        t[key] = t[key] * rng.choice([0.0, float("nan"), -1.0, 2.0, 1e30])
        a.save(art)
        return kind
    if kind in ("field", "drop_key", "bad_path"):
        (art / "manifest.json").write_text(json.dumps(m))
    return kind


def test_random_artifact_corruptions(procon_artifact, tok, tmp_path, capsys):
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for i in range(150):
        case = tmp_path / f"case{i}"
        outside = case / "outside"
        outside.mkdir(parents=True)
        (outside / "outside.safetensors").write_bytes(b"")
        art = case / "art"
        shutil.copytree(procon_artifact, art)
        kinds = [_corrupt(rng, art, outside) for _ in range(rng.randint(1, 2)) if (art / "manifest.json").exists()]
        before = sorted(str(p.relative_to(case)) for p in case.rglob("*") if not p.is_relative_to(art))
        rc = main(["inspect", str(art)])  # the CLI: exit 0 or 2 with a message, never a traceback
        err = capsys.readouterr().err
        assert rc in (0, 2), (i, kinds)
        assert rc == 0 or "safeguard inspect: error:" in err, (i, kinds, err)
        assert "error: '" not in err, (i, kinds, err)  # a bare KeyError text is no message
        key = f"{'+'.join(kinds)}:{'ok' if rc == 0 else 'refused'}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if rc == 0:
            loaded = Artifact.load(art)
            r = loaded.tensors["refusal_direction"]["direction"]
            assert bool(torch.isfinite(r).all()) and torch.allclose(r.norm(dim=-1), torch.ones(r.shape[:2]), atol=1e-3)
            model = tiny_model()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    engine = SafeguardEngine({"artifact": str(art), "procon": {"weight": 10.0}}).setup(model, tok)
            except OURS:
                pass
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"case {i} ({kinds}): raw {type(e).__name__} from setup: {e}")
            else:
                pen = _penalty_is_live(engine, model, tok)
                assert math.isfinite(pen) and pen > 0, (i, kinds, pen)
                engine.detach()
            loaded.save(case / "resaved")
        after = sorted(str(p.relative_to(case)) for p in case.rglob("*")
                       if not p.is_relative_to(art) and not p.is_relative_to(case / "resaved"))
        assert after == before, (i, kinds, set(after) ^ set(before))  # nothing written outside the folders written
        assert not any(p.name.startswith(".") for p in case.iterdir()), (i, kinds)  # no temp/old folder left
        assert os.listdir(outside) and (outside / "outside.safetensors").exists()
    print("artifact corruptions:", dict(sorted(outcomes.items())))
    assert sum(v for k, v in outcomes.items() if k.endswith("refused")) >= 100
