"""Calibration artifacts: a folder with ``manifest.json`` and one safetensors file per component.

Any artifact can be read without the code that made it (``safeguard inspect DIR``). Writes are atomic:
the whole folder is assembled next to the target and renamed into place, so an interrupted calibration
never leaves a half-written artifact behind (and never destroys the previous one).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ArtifactError  # re-exported: safeguard_plugin.artifacts.ArtifactError

logger = logging.getLogger("safeguard_plugin")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


RECALIBRATE = "re-run `safeguard calibrate` to write a new artifact"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # component names: one plain file name, no path


def check_component_name(name: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ArtifactError(f"artifact component name {name!r} is not allowed: use letters, digits, '_', '.' and '-' "
                            "(no path separators, no '..')")
    return name


def safe_relpath(rel: Any, what: str = "file") -> PurePosixPath:
    """``rel`` as a relative POSIX path that stays inside its folder (no absolute path, no '..', no backslash)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"{what} {rel!r} is not a relative path inside the artifact folder")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~") or any(part in ("..", "") for part in p.parts) or p.parts[0] == ".":
        raise ArtifactError(f"{what} {rel!r} is not a relative path inside the artifact folder")
    return p


def _inside(root: Path, rel: PurePosixPath, what: str) -> Path:
    """``root / rel``, refusing a path that a symlink leads out of ``root``."""
    full = root / rel
    real_root = root.resolve()
    if not full.resolve().is_relative_to(real_root):
        raise ArtifactError(f"{what} {full} leads outside the artifact folder {real_root} (symlink); {RECALIBRATE}")
    return full


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


_TMP, _OLD = ".tmp-", ".old-"  # .<name>.tmp-<host>-<pid>-<rand>: a write in progress; .<name>.old-...: the copy it replaces


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _stale_siblings(out: Path, tag: str) -> list[Path]:
    """Temp (``tag=_TMP``) or replaced (``_OLD``) siblings of ``out`` left by a write on this host whose process is
    gone (killed mid-write)."""
    prefix = f".{out.name}{tag}"
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        parts = p.name[len(prefix):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
            continue  # another host's (shared filesystem) or not ours
        if not _pid_alive(int(parts[1])):
            found.append(p)
    return found


def recover_folder(out: str | os.PathLike) -> list[str]:
    """Finish what a killed :func:`write_folder_atomic` left next to ``out``: when ``out`` is missing and the copy it
    was replacing survives (killed between the two renames), put that copy back; delete the temp folders and replaced
    copies of dead writers. Returns what it did (also logged). Safe to call from several processes at once."""
    out = Path(out).resolve()
    done = []
    olds = sorted(_stale_siblings(out, _OLD), key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    if olds and not os.path.lexists(out):
        try:
            os.replace(olds[0], out)
            done.append(f"restored {out} from {olds[0].name} (a write was interrupted between its two renames)")
        except OSError:
            pass  # another process restored it first
        olds = olds[1:]
    for p in olds + _stale_siblings(out, _TMP):
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            done.append(f"removed {p.name} (left by an interrupted write)")
    for msg in done:
        logger.warning("safeguard: %s", msg)
    return done


def check_target(out: Path, owned: Callable[[Path], set[str] | None] | None, what: str) -> None:
    """Raise unless replacing ``out`` can only delete what an earlier write of the same kind put there."""
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if out == Path(out.anchor) or out == home or out == cwd or out in cwd.parents:
        where = ("the filesystem root" if out == Path(out.anchor) else "your home folder" if out == home
                 else "the current folder" if out == cwd else "a folder holding the current folder")
        raise ArtifactError(f"refusing to write the {what} to {out}: it is {where}, and writing replaces the whole "
                            "folder; give a new folder, e.g. --out ./safeguard-artifacts/<model>")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ArtifactError(f"refusing to write the {what} to {out}: a file with that name exists; give a folder path "
                            f"that does not exist yet (or an earlier safeguard {what})")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    known = owned(out) if owned is not None else None
    if known is None:
        raise ArtifactError(
            f"refusing to write the {what} to {out}: the folder exists and is not a safeguard {what} (no readable "
            f"manifest), so replacing it would delete {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}; "
            "give a new folder, or an earlier safeguard " + what)
    extra = [e for e in entries if e not in known]
    if extra:
        raise ArtifactError(
            f"refusing to replace the {what} {out}: it also holds files the {what} does not list "
            f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}), which the write would delete; move them "
            "out or give a new folder")


def write_folder_atomic(out_dir: str | os.PathLike, files: dict[str, bytes | Callable[[Path], None]],
                        owned: Callable[[Path], set[str] | None] | None = None, what: str = "folder") -> Path:
    """Write ``{relative path: bytes, or a function writing that path}`` (in order) as the folder ``out_dir``,
    replacing it atomically: the files go to a temporary sibling first, so a reader (or an interrupted write) never
    sees a half-written folder, and a write killed at any point is repaired by the next write or load
    (:func:`recover_folder`).

    An existing ``out_dir`` is replaced only when it is empty or ``owned(out_dir)`` recognises it as an earlier write
    of the same kind and lists every entry in it: never the current folder, home, the root, a file, or a folder
    holding anything else.
    """
    out = Path(out_dir).resolve()
    paths = {rel: safe_relpath(rel, f"{what} file") for rel in files}
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    check_target(out, owned, what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}{_host()}-{os.getpid()}-", dir=out.parent))
    try:
        for rel, data in files.items():
            target = tmp / paths[rel]
            target.parent.mkdir(parents=True, exist_ok=True)
            if callable(data):
                data(target)
            else:
                target.write_bytes(data)
        if os.path.lexists(out):
            old = out.with_name(f".{out.name}{_OLD}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def artifact_entries(path: Path) -> set[str] | None:
    """The top-level entries an artifact folder's manifest accounts for; None when it is not an artifact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("package") != "safeguard-plugin":
        return None
    entries = {MANIFEST}
    comps = manifest.get("components") if isinstance(manifest.get("components"), dict) else {}
    rels = [m.get("file") for m in comps.values() if isinstance(m, dict)]
    rels += list(manifest.get("files") or {}) if isinstance(manifest.get("files"), dict) else []
    for rel in rels:
        try:
            entries.add(safe_relpath(rel).parts[0])
        except ArtifactError:
            continue
    return entries


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
        check_component_name(name)
        self.tensors[name] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        self.manifest["components"][name] = {"file": f"{name}.safetensors", **meta}

    def has(self, name: str) -> bool:
        return name in self.manifest["components"]

    def add_file(self, relpath: str, data: bytes) -> None:
        """Keep an extra file (relative path inside the artifact folder), written by :meth:`save` and checked by
        sha256 on :meth:`load`."""
        rel = safe_relpath(relpath, "artifact file")
        if rel.as_posix() == MANIFEST or rel.parts[0] in {f"{n}.safetensors" for n in self.manifest["components"]}:
            raise ArtifactError(f"artifact file {relpath!r} would overwrite the manifest or a component file")
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
        """Write the folder atomically; the manifest (written last) records each tensor file's sha256. An existing
        folder is replaced only if it is an artifact holding nothing but what its manifest lists."""
        for name in self.tensors:
            check_component_name(name)
        for rel in self.files:
            safe_relpath(rel, "artifact file")
        files: dict[str, bytes | Callable[[Path], None]] = {
            f"{name}.safetensors": partial(_write_component, tensors, name) for name, tensors in self.tensors.items()}
        files.update(self.files)

        def write_manifest(path: Path) -> None:
            for name in self.tensors:
                meta = self.manifest["components"][name]
                meta["file"] = f"{name}.safetensors"
                meta["sha256"] = sha256_file(path.parent / meta["file"])
            path.write_text(json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")

        files[MANIFEST] = write_manifest
        self.path = write_folder_atomic(out_dir, files, owned=artifact_entries, what="artifact")
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        """Read and validate an artifact folder. Every problem is an :class:`ArtifactError` naming the file or field:
        paths leaving the folder, checksum mismatches, unreadable tensor files, non-finite tensors, manifest fields
        that disagree with the tensors. A write killed mid-way is repaired first (:func:`recover_folder`)."""
        path = Path(path)
        if not path.exists():
            try:
                recover_folder(path)
            except OSError:
                pass
        mf = path / MANIFEST
        if not mf.is_file():
            raise ArtifactError(f"not a safeguard artifact: {mf} is missing (create one with `safeguard calibrate`)")
        _inside(path, PurePosixPath(MANIFEST), "manifest")
        try:
            manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{mf}: corrupt manifest ({err}); {RECALIBRATE}") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{mf}: corrupt manifest (not a JSON object); {RECALIBRATE}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{mf}: format_version {manifest.get('format_version')} is not supported "
                                f"(this package reads {FORMAT_VERSION}); re-run `safeguard calibrate`")
        _check_manifest_fields(manifest, mf)
        tensors = {}
        unchecked = []
        for name, meta in manifest["components"].items():
            try:
                check_component_name(name)
                f = _inside(path, safe_relpath(meta.get("file"), f"components.{name}.file"), f"components.{name}.file")
            except ArtifactError as err:
                raise ArtifactError(f"{mf}: {err}; {RECALIBRATE}") from None
            if not f.is_file():
                raise ArtifactError(f"artifact component '{name}' is missing its tensor file {f}; {RECALIBRATE}")
            digest = meta.get("sha256")
            if digest is None:
                unchecked.append(name)
            elif sha256_file(f) != digest:
                raise ArtifactError(f"artifact file {f} does not match its sha256 in the manifest (modified or "
                                    f"corrupt); {RECALIBRATE}")
            try:
                tensors[name] = load_file(str(f))
            except Exception as err:  # safetensors raises its own error types with no path
                raise ArtifactError(f"artifact file {f} cannot be read ({type(err).__name__}: {err}); the file is "
                                    f"truncated or corrupt: {RECALIBRATE}") from None
            for key, t in tensors[name].items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ArtifactError(f"artifact file {f}: tensor '{key}' of component '{name}' holds NaN or inf "
                                        f"values; {RECALIBRATE}")
        if unchecked:
            logger.warning("safeguard: artifact %s records no sha256 for %s (written by an older version), so those "
                           "files are not checked; %s", path, ", ".join(unchecked), RECALIBRATE)
        files = {}
        for rel, digest in manifest.get("files", {}).items():
            f = _inside(path, safe_relpath(rel, f"{mf}: files entry"), "artifact file")
            if not f.is_file():
                raise ArtifactError(f"artifact file {f} is missing (listed in the manifest); {RECALIBRATE}")
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise ArtifactError(f"artifact file {f} does not match its sha256 in the manifest (modified or "
                                    f"corrupt); {RECALIBRATE}")
            files[rel] = data
        art = cls(manifest, tensors, path, files)
        art.validate()
        return art

    def validate(self) -> None:
        """Check the components this package knows against their manifest fields (the refusal direction: shapes,
        layer and position indices in range, unit directions)."""
        if self.has("refusal_direction"):
            _check_refusal_direction(self.tensors["refusal_direction"], self.manifest["components"]["refusal_direction"],
                                     f"{self.path / MANIFEST if self.path else 'artifact'}")

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
        self.check_structure(model)
        warnings = list(problems)
        if tokenizer is not None and tokenizer_hash(tokenizer) != self.manifest["tokenizer"]["hash"]:
            warnings.append("the tokenizer/chat template differs from the one used at calibration")
        return warnings

    def check_structure(self, model: torch.nn.Module) -> None:
        """Layer count and hidden size of the refusal direction against ``model`` (checked even when
        ``strict_fingerprint: false`` lets other fingerprint differences through: they would index out of range)."""
        if not self.has("refusal_direction"):
            return
        from .distributed import param_shape
        from .modeling import find_decoder_layers

        meta = self.manifest["components"]["refusal_direction"]
        n = len(find_decoder_layers(model))
        d = param_shape(model.get_input_embeddings().weight)[-1]
        if meta["num_layers"] != n or meta["hidden_size"] != d:
            raise ArtifactError(
                f"artifact {self.path}: components.refusal_direction has {meta['num_layers']} layers of size "
                f"{meta['hidden_size']}, the model {n} layers of size {d}: it was calibrated on another model; "
                "re-run `safeguard calibrate --model <your model>`")

    def summary(self, tensors: bool = False, width: int = 200) -> str:
        """A short, human-readable summary (``safeguard inspect DIR``): model and fingerprint, calibration data
        hashes, and per component its key meta, tensor count, size and layers -- a few lines per component however
        many tensors it holds. ``tensors=True`` appends the full tensor list (name, shape, dtype), one per line."""
        m = self.manifest
        fp = m["model"].get("fingerprint", {})
        st = fp.get("structure") or {}
        arch = ", ".join(f"{k} {st[k]}" for k in ("model_type", "num_hidden_layers", "hidden_size") if st.get(k))
        lines = [f"artifact: {self.path}",
                 f"model: {_short(m['model'].get('id'), 100)} (fingerprint {fp.get('id')}{'; ' + arch if arch else ''})",
                 f"created: {m.get('created', '?')} by safeguard-plugin {m.get('package_version', '?')}, format "
                 f"{m.get('format_version', '?')}, tokenizer hash {(m.get('tokenizer') or {}).get('hash', '?')}"]
        lines = [_clip(line, width) for line in lines]
        if m.get("calibrated_for"):
            lines.append(_clip(f"calibrated for: {', '.join(map(str, m['calibrated_for']))}", width))
        for name, d in (m.get("data") or {}).items():
            if isinstance(d, dict):
                counts = ", ".join(f"{k[2:]} {d[k]}" for k in ("n_train", "n_heldout") if k in d)
                lines.append(_clip(f"data {name}: sha256 {d.get('sha256', '?')}" + (f" ({counts})" if counts else "")
                                   + f", source {d.get('source', '?')}", width))
            else:
                lines.append(_clip(f"data {name}: {d}", width))
        comps = m["components"]
        sizes = {n: sum(t.numel() * t.element_size() for t in self.tensors.get(n, {}).values()) for n in comps}
        n_all = sum(len(self.tensors.get(n, {})) for n in comps)
        lines.append(f"components: {len(comps)}, {n_all} tensors, {_human_bytes(sum(sizes.values()))}")
        for name, meta in comps.items():
            ts = self.tensors.get(name, {})
            layers = meta.get("selected_layers", meta.get("layer"))
            layers = _ranges(layers if isinstance(layers, list) else [layers]) if layers is not None else \
                _ranges(_tensor_layers(ts))
            lines.append(_clip(f"  {name}: {len(ts)} tensors, {_human_bytes(sizes[name])}"
                               + (f", layers {layers}" if layers else ""), width))
            # quality figures first (held-out AUROC/accuracy, explained variance, ...): the line is clipped at width
            keys = sorted((k for k, v in meta.items() if k not in ("file", "sha256", "selected_layers", "layer")
                           and not isinstance(v, (list, dict))),
                          key=lambda k: not any(q in k for q in ("heldout", "auroc", "accuracy", "explained", "dead")))
            short = [f"{k}={_short(meta[k])}" for k in keys]
            if short:
                lines.append(_clip("    " + ", ".join(short), width))
        if m.get("files"):
            lines.append(_clip(f"files: {len(m['files'])} ({', '.join(m['files'])})", width))
        if not tensors:
            lines.append(f"(tensor list: safeguard inspect {self.path or 'DIR'} --tensors)")
            return "\n".join(lines)
        lines.append("tensors:")
        for name in comps:
            for k, t in self.tensors.get(name, {}).items():
                lines.append(f"  {name}/{k} {list(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _short(v: Any, n: int = 48) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text if len(text) <= n else text[: n - 1] + "…"


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _tensor_layers(tensors: dict[str, torch.Tensor]) -> list[int]:
    """Layer indices named by per-layer tensors ('3.mlp.up_proj.U', 'gradient.3.self_attn.q_proj.V')."""
    found = set()
    for k in tensors:
        parts = k.split(".")
        for p in parts[:2]:
            if p.isdigit() and len(parts) > 2:
                found.add(int(p))
                break
    return sorted(found)


def _ranges(values: list[Any]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    if not all(isinstance(v, int) for v in values):
        return ", ".join(map(str, values))
    out: list[str] = []
    for v in sorted(set(values)):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


def _check_manifest_fields(manifest: dict[str, Any], mf: Path) -> None:
    def need(obj: Any, key: str, typ: type, where: str) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, typ):
            raise ArtifactError(f"{mf}: field '{where}{key}' is missing or not a {typ.__name__}; {RECALIBRATE}")
        return value

    model = need(manifest, "model", dict, "")
    fp = need(model, "fingerprint", dict, "model.")
    need(fp, "structure", dict, "model.fingerprint.")
    need(fp, "samples", dict, "model.fingerprint.")
    need(need(manifest, "tokenizer", dict, ""), "hash", str, "tokenizer.")
    for name, meta in need(manifest, "components", dict, "").items():
        need(meta, "file", str, f"components.{name}.")
    if "files" in manifest:
        files = need(manifest, "files", dict, "")
        for rel, digest in files.items():
            if not isinstance(digest, str):
                raise ArtifactError(f"{mf}: files.{rel} must be a sha256 string; {RECALIBRATE}")


def _check_refusal_direction(t: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> None:
    def bad(msg: str) -> ArtifactError:
        return ArtifactError(f"{where}: components.refusal_direction: {msg}; {RECALIBRATE}")

    r = t.get("direction")
    if r is None or r.ndim != 3:
        raise bad("tensor 'direction' is missing or not (layers, positions, hidden)")
    L, P, d = r.shape
    for key, want in (("num_layers", L), ("num_positions", P), ("hidden_size", d)):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v != want:
            raise bad(f"field '{key}' is {v!r} but the direction tensor has {want}")
    for key in ("norm", "std", "separation", "mean_harmful", "mean_harmless"):
        if key in t and tuple(t[key].shape) != (L, P):
            raise bad(f"tensor '{key}' has shape {tuple(t[key].shape)}, expected {(L, P)}")
    layers = meta.get("selected_layers")
    if (not isinstance(layers, list) or not layers
            or any(not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < L for x in layers)):
        raise bad(f"field 'selected_layers' is {layers!r}; it must list layer indices in 0..{L - 1}")
    pos = meta.get("selected_position")
    if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < P:
        raise bad(f"field 'selected_position' is {pos!r}; it must be a position index in 0..{P - 1}")
    norms = r.float().norm(dim=-1)
    off = (norms - 1).abs() > 1e-3
    if bool(off.any()):
        li, pi = (int(x) for x in off.nonzero()[0])
        raise bad(f"the direction at layer {li}, position {pi} has norm {float(norms[li, pi]):.3g} instead of 1 "
                  "(a zero or corrupted direction would make every penalty 0)")
    if "std" in t and bool((t["std"] <= 0).any()):
        raise bad("tensor 'std' has entries <= 0")
