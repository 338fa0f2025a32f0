"""Run state kept beside the engine: the reference cache and the checkpoint file that carries it.

* :class:`ReferenceCache`: original-model values per constraint and prompt prefix (``Constraint.reference_values`` of
  the activations at the post-instruction positions), keyed by a hash of the prompt's token ids up to and including
  its post-instruction tokens. Filled before training (``engine.precompute_references``) and lazily while the original
  weights are reachable.
* :func:`save_state` / :func:`load_state`: ``safeguard_state.safetensors`` next to a Trainer checkpoint, holding the
  cache, each constraint's ``state_dict()`` (tensors in the file, the rest in its metadata) and the engine's counters,
  so that resuming full fine-tuning does not need the original weights again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .modeling import capture_layers, pad_right, run_until

if TYPE_CHECKING:
    from .constraints.base import Constraint

STATE_FILE = "safeguard_state.safetensors"


def prefix_key(row: torch.Tensor) -> bytes:
    """The cache key of a prompt prefix (token ids)."""
    return hashlib.blake2b(row.to("cpu", torch.int64).numpy().tobytes(), digest_size=16).digest()


class ReferenceCache:
    """``{constraint name: {prefix key: value}}`` (CPU tensors, one row per prompt prefix)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[bytes, torch.Tensor]] = {}

    def holds(self, key: bytes, names: Iterable[str]) -> bool:
        """Whether every constraint in ``names`` has a value for ``key``."""
        return all(key in self.values.get(n, {}) for n in names)

    @staticmethod
    def keys(ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> list[bytes | None]:
        """Per row of ``ids``: the key of its prefix up to the last post-instruction position ``pos[:, -1]`` (None
        where ``valid`` is False)."""
        ends = (pos[:, -1] + 1).tolist()
        ids_cpu = ids.detach().cpu()
        return [(prefix_key(ids_cpu[i, : ends[i]]) if v else None) for i, v in enumerate(valid.tolist())]

    def rows(self, name: str, keys: Sequence[bytes | None], usable: torch.Tensor) -> torch.Tensor | None:
        """``name``'s values for ``keys``, stacked ``(B, ...)`` (zeros where a row is not ``usable`` or has none);
        None when no row has one."""
        cache = self.values.get(name, {})
        found = [cache.get(k) if (k is not None and usable[i]) else None for i, k in enumerate(keys)]
        template = next((r for r in found if r is not None), None)
        if template is None:
            return None
        return torch.stack([r if r is not None else torch.zeros_like(template) for r in found])

    @torch.no_grad()
    def compute(self, model: torch.nn.Module, users: Sequence[Constraint], layers: Sequence[int], n_positions: int,
                prefixes: list[list[int]], batch_size: int = 16, progress: bool = False) -> None:
        """Run ``model`` (the caller has put it in reference mode: original weights, hooks inactive) on each prompt
        prefix (which ends with its ``n_positions`` post-instruction tokens) through the last of ``layers``, and store
        each user's ``reference_values`` of the activations there."""
        if not users or not prefixes:
            return
        device = next(model.parameters()).device
        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
        it: Iterable = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="safeguard: reference values", unit="batch")
        for s in it:
            chunk = [prefixes[i] for i in order[s: s + batch_size]]
            ids, mask = pad_right(chunk, 0)
            lengths = mask.sum(1)
            with capture_layers(model, layers) as store:
                run_until(model, input_ids=ids.to(device), attention_mask=mask.to(device))
            pos = (lengths - n_positions).unsqueeze(1) + torch.arange(n_positions)
            acts = {}
            for layer, a in store.items():
                idx = pos.to(a.device).unsqueeze(-1).expand(-1, -1, a.shape[-1])
                acts[layer] = a.gather(1, idx).float()
            keys = [prefix_key(torch.tensor(p)) for p in chunk]
            for c in users:
                vals = c.reference_values(acts).detach().cpu()
                cache = self.values.setdefault(c.name, {})
                for k, v in zip(keys, vals):
                    cache[k] = v


def save_state(folder: str | os.PathLike, cache: ReferenceCache, constraints: Sequence[Constraint],
               counters: dict[str, int]) -> str:
    """Write the cache, the constraints' state and ``counters`` to ``folder/STATE_FILE`` (atomically); returns the
    path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = dict(counters)
    for name, values in cache.values.items():
        if values:
            keys = list(values)
            tensors[f"ref.{name}"] = torch.stack([values[k] for k in keys]).contiguous()
            meta[f"keys.{name}"] = [k.hex() for k in keys]
    for c in constraints:  # constraint state: tensors in the file, the rest in the metadata
        plain = {}
        for k, v in (c.state_dict() or {}).items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{c.name}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                plain[k] = v
        if plain:
            meta[f"state.{c.name}"] = plain
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STATE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"safeguard": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_state(folder: str | os.PathLike, cache: ReferenceCache, constraints: Sequence[Constraint],
               counters: Iterable[str]) -> dict[str, int] | None:
    """Read ``folder/STATE_FILE`` into ``cache`` and the constraints (``load_state_dict``); returns the saved values of
    ``counters`` (0 when absent), or None when the folder holds no state file."""
    from safetensors import safe_open

    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    states: dict[str, dict[str, Any]] = {}
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["safeguard"])
        for t in f.keys():
            if t.startswith("state."):
                _, cname, key = t.split(".", 2)
                states.setdefault(cname, {})[key] = f.get_tensor(t)
                continue
            name = t[len("ref."):]
            vals = f.get_tensor(t)
            cache.values[name] = {bytes.fromhex(k): v for k, v in zip(meta[f"keys.{name}"], vals)}
    for c in constraints:
        st = {**meta.get(f"state.{c.name}", {}), **states.get(c.name, {})}
        if st:
            c.load_state_dict(st)
    return {k: int(meta.get(k, 0)) for k in counters}


__all__ = ["STATE_FILE", "ReferenceCache", "load_state", "prefix_key", "save_state"]
