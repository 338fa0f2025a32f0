"""Worker for tests/test_deepspeed.py: train a tiny model with SFTTrainer + SafeguardCallback for each case and save
the logged losses and the trained weights (full fp32, as the optimizer sees them).

    python tests/ds_worker.py --stage 0 --art DIR --out DIR            # single process, no DeepSpeed, batch 4
    torchrun --nproc_per_node 2 tests/ds_worker.py --stage 2 ...       # ZeRO-2, 2 ranks × batch 2 (gloo, CPU)
    torchrun --nproc_per_node 2 tests/ds_worker.py --stage 3 ...       # ZeRO-3

One launch runs every case (``--cases``) one after the other, so the process start-up is paid once per stage.
Writes (rank 0) ``<out>/<case>-<stage>.safetensors``: the trained params, with {"losses", "engine", "world_size",
"metrics", "stop_reason"} as JSON in the file's metadata (no pickle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4
TARGETS = ["q_proj", "v_proj", "up_proj"]


def rows() -> list[dict]:
    """16 conversational examples; 4 have prompts longer than ``max_length``, so truncation removes their
    post-instruction tokens and their response: ranks then hold different numbers of valid rows and tokens."""
    out = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
            "completion": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}." * (1 + a % 3)}]}
           for a in range(6) for b in range(2)]
    long = "Explain step by step how to pick a lock on a neighbour's front door without being noticed. " * 4
    out += [{"prompt": [{"role": "user", "content": long + str(i)}],
             "completion": [{"role": "assistant", "content": "I can't help with that."}]} for i in range(4)]
    return out


# The settings each built-in constraint is tested with; a registered constraint not listed here (a new or third-party
# one) is tested with its defaults on LoRA (``case_for``), so it is covered without editing this file.
CASES = {
    # full fine-tuning, cached per-prompt references (precompute pass), per-row mean over valid rows
    "procon": (lambda art: {"artifact": art, "procon": {"weight": 100.0, "warmup_ratio": 0.0}}, False),
    # LoRA, live adapter-disabled reference forward per micro-batch, per-example risk weights from the probe
    "adaptive_kl": (lambda art: {"artifact": art, "adaptive_kl": {"risk": "probe"}}, True),
    # full fine-tuning, precomputed top-k reference log-probs (LM head used outside its forward)
    "adaptive_kl_full": (lambda art: {"artifact": art, "adaptive_kl": {"risk": "probe", "reference": "precomputed"}},
                         False),
    # GuardSpace adapters injected by the callback (no peft_config)
    "guardspace": (lambda art: {"artifact": art, "guardspace": {"rank": 2, "target_modules": TARGETS}}, None),
    # CWAC coupled on LoRA: factor projection after each step (fp32 masters) + SAE feature term (cached references)
    "cwac": (lambda art: {"artifact": art, "cwac": {"sae_weight": 10.0}}, True),
    # CWAC on full fine-tuning: ΔW projection through the low-rank anchors U^T W0 / W0 V
    "cwac_full": (lambda art: {"artifact": art, "cwac": {"sae_weight": 10.0}}, False),
    # monitor alone (no loss term): alerts at step 2 and restores the train-begin weights (fp32 master too)
    "monitor": (lambda art: {"artifact": art, "monitor": {"every_n_steps": 2, "n_prompts": 4, "min_cosine": 1.0,
                                                          "max_score_drop": None, "action": "restore"}}, False),
}


# constraints that refuse ZeRO-3 before step 1 (the test checks the message names the fix)
REFUSES_ZERO3 = {"anchor": "use ZeRO-2"}

EXTRA_CASES = ["adaptive_kl_full", "cwac_full", "procon_zinit", "guardspace_zinit"]


def all_cases() -> list[str]:
    """Every registered constraint (with its entry in CASES, or its defaults) plus the extra variants above."""
    from safeguard_plugin.registry import available_constraints

    return [*available_constraints(), *EXTRA_CASES]


def case_for(name: str):
    if name in CASES:
        return CASES[name]
    return (lambda art: {"artifact": art, name: {}}), True


def ds_config(stage: int, path: str) -> str:
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "bf16": {"enabled": False}, "fp16": {"enabled": False},
           "zero_optimization": {"stage": stage}}
    if stage == 3:  # partition every parameter of the tiny model (the default keeps small ones whole)
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                                         "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0})
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def run_case(name: str, stage: int, art: str, out: str, tok) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from safeguard_plugin.distributed import (
        get_full_param,
        is_main_process,
        main_process_first,
        rank,
        world_size,
    )
    from safeguard_plugin.integrations.trl import SafeguardCallback
    from safeguard_plugin.testing import tiny_model

    make_cfg, lora = case_for(name.removesuffix("_zinit"))
    zinit = name.endswith("_zinit")
    if stage:  # a previous case's DeepSpeed config would make from_config use zero.Init
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    torch.manual_seed(0)
    model = tiny_model()  # built before the DeepSpeed config exists: partitioned by deepspeed.initialize
    ws = world_size()
    if zinit:  # the usual script order: TrainingArguments first, then from_pretrained (under ZeRO-3: zero.Init)
        folder = os.path.join(out, "tiny-model")
        with main_process_first() as first:
            if first:
                model.save_pretrained(folder, is_main_process=True)
        del model
    args = SFTConfig(output_dir=os.path.join(out, f"run-{name}-{stage}"), max_steps=STEPS,
                     per_device_train_batch_size=GLOBAL_BATCH // ws, learning_rate=1e-3, logging_steps=1,
                     report_to=[], use_cpu=True, bf16=False, fp16=False, save_strategy="no", seed=0, data_seed=0,
                     disable_tqdm=True, lr_scheduler_type="constant", dataloader_num_workers=0, max_length=40,
                     deepspeed=ds_config(stage, os.path.join(out, f"ds{stage}-rank{rank()}.json")) if stage else None)
    if zinit:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM") if lora else None
    cb = SafeguardCallback(make_cfg(art))
    tr = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows()), processing_class=tok,
                    peft_config=peft, callbacks=[cb])
    if stage == 3 and name in REFUSES_ZERO3:  # refused before step 1, with the message recorded for the test
        try:
            tr.train()
        except Exception as err:  # noqa: BLE001 - the test checks the message
            if is_main_process():
                from safetensors.torch import save_file

                save_file({}, os.path.join(out, f"{name}-{stage}.safetensors"),
                          metadata={"info": json.dumps({"refused": f"{type(err).__name__}: {err}"})})
            return
        raise AssertionError(f"{name} trained under ZeRO-3 although it is listed in REFUSES_ZERO3")
    tr.train()
    engine_type = type(tr.model_wrapped).__name__
    params = {n: get_full_param(p).cpu() for n, p in tr.model.named_parameters() if p.requires_grad}
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    metrics = [{k: v for k, v in h.items() if k.startswith("safeguard/")} for h in tr.state.log_history if "loss" in h]
    if is_main_process():
        from safetensors.torch import save_file

        info = {"losses": losses, "engine": engine_type, "world_size": ws, "metrics": metrics,
                "stop_reason": cb.engine.stop_reason}
        save_file({k: v.contiguous() for k, v in params.items()}, os.path.join(out, f"{name}-{stage}.safetensors"),
                  metadata={"info": json.dumps(info)})
    if stage:
        tr.accelerator.free_memory()
        import deepspeed

        deepspeed.runtime.utils.empty_cache() if hasattr(deepspeed.runtime.utils, "empty_cache") else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, choices=[0, 2, 3], default=0)
    ap.add_argument("--art", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=None, help="comma-separated (default: all_cases())")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.stage:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    from safeguard_plugin.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    os.makedirs(a.out, exist_ok=True)
    for name in a.cases.split(",") if a.cases else all_cases():
        run_case(name, a.stage, a.art, a.out, tok)
    if a.stage:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
