"""Where adaptive KL's per-step cost goes, on one LoRA training micro-batch timed piece by piece.

    python benchmarks/profile_adaptive_kl.py --model smollm2-135m-instruct --repeats 5
    python benchmarks/profile_adaptive_kl.py --model tiny                    # seconds, for a smoke check

The micro-batch is the one ``benchmarks/overhead.py`` trains on (TRL's collator, batch 8, ~100 tokens). Medians of
``--repeats`` runs after one warm-up, in one process (so the pieces are comparable with each other; the end-to-end
ratios of record come from ``overhead.py``):

* ``step plain`` — TRL's loss (backbone + fused LM head over every position) and its backward, no safeguard;
* ``step live`` — the same with adaptive KL, constant risk 5 (every row has a KL term), live reference; its parts:
  ``reference forward`` (adapter disabled, no grad, stopped at the final norm; the same forward to the full logits
  is shown for comparison), ``LM-head term`` (policy and reference logits at the response positions, KL, CE and
  the gradient wrt the final hidden states, in one pass) and, inside it, the three (n × d × V) matmuls;
* ``step precomputed`` — adaptive KL with ``reference: precomputed`` (top-k reference log-probs cached once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--answer-words", type=int, default=48)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from datasets import Dataset
    from overhead import _load, _rows
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from safeguard_plugin.constraints import adaptive_kl as akl_mod
    from safeguard_plugin.engine import SafeguardEngine

    torch.manual_seed(0)
    model, tok = _load(args.model)
    sft_args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=args.batch_size,
                         report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, max_length=256,
                         dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(_rows(args.batch_size, args.answer_words)),
                         processing_class=tok, peft_config=lora)
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    T: dict[str, list[float]] = defaultdict(list)

    def step():
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(name, fn, n=args.repeats):
        fn()  # warm-up
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            T[name].append(time.perf_counter() - t0)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    timed("step plain", step)

    # -- live reference: time its pieces from inside the step
    captured = {}
    real_head = akl_mod._HeadObjective

    class TimedHead:
        @staticmethod
        def apply(*a):
            captured["args"] = a
            sync()
            t0 = time.perf_counter()
            out = real_head.apply(*a)
            sync()
            T["LM-head term"].append(time.perf_counter() - t0)
            return out

    def attach(cfg):
        eng = SafeguardEngine(cfg).setup(model, tok)
        eng.begin_training(100, 1)
        eng.precompute_references([batch], progress=False)
        real_ref = eng.reference_hidden

        def ref(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = real_ref(*a, **k)
            sync()
            T["reference forward (to the final norm)"].append(time.perf_counter() - t0)
            return out

        eng.reference_hidden = ref
        return eng

    akl_mod._HeadObjective = TimedHead
    try:
        eng = attach({"adaptive_kl": {"risk": "constant", "risk_options": {"score": 5}, "reference": "live"}})
        T.pop("reference forward (to the final norm)", None)
        timed("step live", step)
        eng.detach()
        T["LM-head term"] = T["LM-head term"][1:]
        T["reference forward (to the final norm)"] = T["reference forward (to the final norm)"][1:]
    finally:
        akl_mod._HeadObjective = real_head

    # the same reference forward to the full logits (what stopping at the final norm saves)
    from safeguard_plugin.modeling import reference_mode

    with reference_mode(model):
        timed("reference forward (full logits)", lambda: model(input_ids=batch["input_ids"],
                                                                attention_mask=batch["attention_mask"]))

    # the three (n × d × V) matmuls of the LM-head term
    h, W = captured["args"][0].detach(), captured["args"][1].detach()
    n, V = h.shape[0], W.shape[0]
    g = torch.randn(n, V, dtype=torch.float32, device=h.device)
    with torch.no_grad():
        timed("  policy logits matmul", lambda: torch.nn.functional.linear(h, W))
        timed("  gradient matmul (g @ W)", lambda: g @ W)

    eng = SafeguardEngine({"adaptive_kl": {"risk": "constant", "risk_options": {"score": 5},
                                           "reference": "precomputed"}}).setup(model, tok)
    eng.begin_training(100, 1)
    eng.precompute_references([batch], progress=False)
    timed("step precomputed", step)
    eng.detach()
    timed("step plain", step)  # again, to see drift

    med = {k: statistics.median(v) for k, v in T.items()}
    base = med["step plain"]
    print(f"model {args.model}, LoRA r={args.lora_r}, batch {tuple(batch['input_ids'].shape)}, "
          f"{n} response tokens, vocab {V}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; medians of {args.repeats}")
    print("| piece | s | × plain step |\n|---|---|---|")
    order = ["step plain", "step live", "reference forward (to the final norm)", "reference forward (full logits)",
             "LM-head term", "  policy logits matmul", "  gradient matmul (g @ W)", "step precomputed"]
    for k in order:
        print(f"| {k} | {med[k]:.3f} | {med[k] / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
