"""Calibration artifacts: a folder with ``manifest.json`` and one safetensors file per component.

Any artifact can be read without the code that made it (``safeguard inspect DIR``). Writes are atomic:
the whole folder is assembled next to the target and renamed into place, so an interrupted calibration
never leaves a half-written artifact behind (and never destroys the previous one).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact that is missing, malformed, or made for another model."""


def sha256_text(items: list[str] | str) -> str:
    h = hashlib.sha256()
    for s in [items] if isinstance(items, str) else items:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- fingerprint
_FP_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                   "num_attention_heads", "num_key_value_heads")
_FP_SAMPLES = 64


def _base_config(model: torch.nn.Module):
    cfg = getattr(model, "config", None)
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None:  # PEFT wrapper
        cfg = getattr(get_base(), "config", cfg)
    if cfg is None:
        raise ArtifactError(f"{type(model).__name__} has no .config; pass a transformers model")
    return getattr(cfg, "get_text_config", lambda: cfg)()


def _sample_values(w: torch.Tensor) -> list[float]:
    flat = w.detach().reshape(-1)
    if flat.numel() == 0:
        return []
    idx = (torch.arange(_FP_SAMPLES, dtype=torch.long) * (flat.numel() - 1) // (_FP_SAMPLES - 1)).to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Structural config plus strided samples of the input-embedding and first/last decoder weights.

    Values are compared with a tolerance on load, so a bf16/fp16 copy of the same model matches while a
    different model (or a fine-tuned one) does not.
    """
    from .modeling import find_decoder_layers

    cfg = _base_config(model)
    structure = {k: getattr(cfg, k, None) for k in _FP_CONFIG_KEYS}
    layers = find_decoder_layers(model)
    tensors = {"embed": model.get_input_embeddings().weight}
    for tag, layer in (("first", layers[0]), ("last", layers[-1])):
        for name, p in layer.named_parameters():
            if p.ndim == 2 and "lora_" not in name:
                tensors[f"{tag}_layer:{name.replace('.base_layer', '')}"] = p
                break
    samples = {k: _sample_values(v) for k, v in tensors.items()}
    digest = sha256_text([json.dumps(structure, sort_keys=True)] + [f"{k}={v[:8]}" for k, v in sorted(samples.items())])
    return {"structure": structure, "samples": samples, "id": digest[:16]}


def compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any], rtol: float = 2e-2) -> list[str]:
    """Human-readable differences; empty when the two fingerprints describe the same weights."""
    problems = []
    for k, v in expected.get("structure", {}).items():
        if actual["structure"].get(k) != v:
            problems.append(f"config.{k}: artifact has {v}, model has {actual['structure'].get(k)}")
    if problems:
        return problems
    for k, v in expected.get("samples", {}).items():
        got = actual["samples"].get(k)
        if got is None:
            problems.append(f"weight sample '{k}' not found in the model")
            continue
        a, b = torch.tensor(v), torch.tensor(got)
        scale = a.abs().max().clamp(min=1e-6)
        if a.shape != b.shape or ((a - b).abs().max() / scale) > rtol:
            problems.append(f"weights of '{k}' differ from the calibrated model's")
    return problems


def tokenizer_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return sha256_text([str(template), str(len(tokenizer)), type(tokenizer).__name__])[:16]


def _write_component(tensors: dict[str, torch.Tensor], name: str, path: Path) -> None:
    save_file(tensors, str(path), metadata={"component": name})


def write_folder_atomic(out_dir: str | os.PathLike, files: dict[str, bytes | Callable[[Path], None]]) -> Path:
    """Write ``{relative path: bytes, or a function writing that path}`` as the folder ``out_dir``, replacing it
    atomically: the files go to a temporary sibling first, so a reader (or an interrupted write) never sees a
    half-written folder."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if callable(data):
                data(tmp / rel)
            else:
                (tmp / rel).write_bytes(data)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------- artifact
class Artifact:
    """In-memory view of an artifact folder: manifest + named tensor components."""

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], path: Path | None = None,
                 files: dict[str, bytes] | None = None):
        self.manifest = manifest
        self.tensors = tensors
        self.path = path
        self.files: dict[str, bytes] = dict(files or {})  # extra files by relative path (e.g. an SAELens SAE folder)

    # -- construction
    @classmethod
    def new(cls, model: torch.nn.Module, tokenizer, model_id: str) -> Artifact:
        from . import __version__

        manifest = {
            "format_version": FORMAT_VERSION,
            "package": "safeguard-plugin",
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"id": model_id, "fingerprint": model_fingerprint(model)},
            "tokenizer": {"hash": tokenizer_hash(tokenizer)},
            "data": {},
            "components": {},
        }
        return cls(manifest, {})

    def add_component(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tensors[name] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        self.manifest["components"][name] = {"file": f"{name}.safetensors", **meta}

    def has(self, name: str) -> bool:
        return name in self.manifest["components"]

    def add_file(self, relpath: str, data: bytes) -> None:
        """Keep an extra file (relative path inside the artifact folder), written by :meth:`save` and checked by
        sha256 on :meth:`load`."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or rel.name in (MANIFEST,):
            raise ValueError(f"artifact file path must be relative and inside the folder: {relpath}")
        self.files[rel.as_posix()] = bytes(data)
        self.manifest.setdefault("files", {})[rel.as_posix()] = hashlib.sha256(data).hexdigest()

    def read_file(self, relpath: str) -> bytes:
        if relpath not in self.files:
            raise ArtifactError(f"artifact {self.path or ''} has no file '{relpath}'")
        return self.files[relpath]

    def component(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not self.has(name):
            have = ", ".join(self.manifest["components"]) or "none"
            raise ArtifactError(
                f"artifact {self.path or ''} has no '{name}' component (it has: {have}); "
                f"re-run `safeguard calibrate` with the constraint that needs it enabled"
            )
        return self.tensors[name], self.manifest["components"][name]

    # -- io
    def save(self, out_dir: str | os.PathLike) -> Path:
        files: dict[str, bytes | Callable[[Path], None]] = {
            f"{name}.safetensors": partial(_write_component, tensors, name) for name, tensors in self.tensors.items()}
        files.update(self.files)
        files[MANIFEST] = (json.dumps(self.manifest, indent=2, sort_keys=False) + "\n").encode()
        self.path = write_folder_atomic(out_dir, files)
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise ArtifactError(f"not a safeguard artifact: {mf} is missing (create one with `safeguard calibrate`)")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{mf}: corrupt manifest ({err})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{mf}: format_version {manifest.get('format_version')} is not supported "
                                f"(this package reads {FORMAT_VERSION}); re-run `safeguard calibrate`")
        tensors = {}
        for name, meta in manifest.get("components", {}).items():
            f = path / meta["file"]
            if not f.is_file():
                raise ArtifactError(f"artifact component '{name}' is missing its tensor file {f}")
            tensors[name] = load_file(str(f))
        files = {}
        for rel, digest in manifest.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                raise ArtifactError(f"artifact file {f} is missing (listed in the manifest)")
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise ArtifactError(f"artifact file {f} does not match its sha256 in the manifest (modified or corrupt)")
            files[rel] = data
        return cls(manifest, tensors, path, files)

    # -- checks
    def check_model(self, model: torch.nn.Module, tokenizer=None, strict: bool = True) -> list[str]:
        """Raise :class:`ArtifactError` if the artifact was made for another model; return warnings."""
        problems = compare_fingerprints(self.manifest["model"]["fingerprint"], model_fingerprint(model))
        if problems and strict:
            raise ArtifactError(
                f"artifact {self.path} was calibrated on '{self.manifest['model'].get('id')}', not on this model: "
                + "; ".join(problems)
                + ". Re-run `safeguard calibrate --model <your model>` or point `artifact:` at the right folder "
                "(strict_fingerprint: false overrides this check)."
            )
        warnings = list(problems)
        if tokenizer is not None and tokenizer_hash(tokenizer) != self.manifest["tokenizer"]["hash"]:
            warnings.append("the tokenizer/chat template differs from the one used at calibration")
        return warnings

    def summary(self) -> str:
        m = self.manifest
        lines = [f"artifact: {self.path}", f"model: {m['model']['id']} (fingerprint {m['model']['fingerprint']['id']})",
                 f"created: {m['created']} by safeguard-plugin {m['package_version']}"]
        for name, d in m.get("data", {}).items():
            lines.append(f"data.{name}: {d}")
        for name, meta in m["components"].items():
            shapes = {k: list(v.shape) for k, v in self.tensors.get(name, {}).items()}
            short = {k: v for k, v in meta.items() if k not in ("file",) and not isinstance(v, (list, dict))}
            lines.append(f"component {name}: {short}")
            for k in ("selected_layers", "offsets"):
                if k in meta:
                    lines.append(f"  {k}: {meta[k]}")
            lines.append(f"  tensors: {shapes}")
        return "\n".join(lines)
