"""Tiny in-process models and tokenizers for tests, the ``--model tiny`` demo and benchmarks' smoke runs.

Nothing is downloaded: a byte-level BPE tokenizer is trained on the shipped prompt sets (with a ChatML
chat template) and a random Llama/Qwen2 model of a few layers is built from its config.
"""

from __future__ import annotations

import functools

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=2)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .data import read_jsonl

    texts = [r["prompt"] for n in ("harmful", "harmless", "borderline") for r in read_jsonl(n)]
    texts += [r["text"] for n in ("refusals", "compliance") for r in read_jsonl(n)]
    texts += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None)
    tok.chat_template = CHATML
    return tok


def tiny_model(arch: str = "qwen2", vocab_size: int = 1024, hidden: int = 64, layers: int = 4, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    cfg = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
