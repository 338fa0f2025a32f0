"""``safeguard`` command line: calibrate, eval, inspect, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(args):
    from .modeling import load_model_spec

    model, tok = load_model_spec(args.model, gguf_file=args.gguf_file, dtype=_DTYPES[args.dtype],
                                 adapter=getattr(args, "adapter", None))
    return model, tok, args.model


def cmd_calibrate(args) -> int:
    from .calibration import calibrate
    from .data import load_prompts

    if args.axolotl_config:
        from .integrations.axolotl import calibrate_from_axolotl_config

        print(calibrate_from_axolotl_config(args.axolotl_config))
        return 0
    if not args.model or not args.out:
        raise ValueError("calibrate needs --model and --out (or --axolotl-config x.yaml)")

    harmful = load_prompts(args.harmful, limit=args.limit)
    harmless = load_prompts(args.harmless, limit=args.limit)
    model, tok, model_id = _load(args)
    constraints = args.constraints.split(",") if args.constraints else None
    configs = {}
    if args.config:
        from .config import load_config

        configs = load_config(args.config).constraint_configs()
        constraints = constraints or list(configs)
    base = None
    if args.base_model:
        from .modeling import load_model_spec

        base, _ = load_model_spec(args.base_model, dtype=_DTYPES[args.dtype])
    art = calibrate(model, tok, harmful, harmless, args.out, model_id=model_id, constraints=constraints,
                    batch_size=args.batch_size, base_model=base, constraint_configs=configs)
    print(art.summary())
    return 0


def cmd_inspect(args) -> int:
    from .artifacts import Artifact

    art = Artifact.load(args.artifact)
    print(json.dumps(art.manifest, indent=2) if args.json else art.summary())
    return 0


def cmd_eval(args) -> int:
    from .data import load_prompts
    from .eval import evaluate_refusal, markdown_table, write_report

    sets = {}
    for spec in args.prompts:
        ps = load_prompts(spec)
        sets[Path(spec).stem if Path(spec).is_file() else spec] = {"heldout": ps.heldout, "train": ps.train,
                                                                  "all": ps.all}[args.split][: args.limit]
    model, tok, _ = _load(args)
    res = evaluate_refusal(model, tok, sets, args.max_new_tokens, args.batch_size)
    js, md = write_report(res, args.out, title=f"safeguard eval: {args.model}" + (f" + {args.adapter}" if args.adapter else ""))
    print(markdown_table({args.model: res}, list(sets)))
    print(f"wrote {js} and {md}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.out)
    return 0


def cmd_bench(args) -> int:
    from .bench import Bench

    ratios = tuple(float(x) for x in args.ratios.split(",")) if args.ratios else None
    methods = args.methods.split(",") if args.methods else None
    Bench(args.model, args.profile, args.out, ratios=ratios, methods=methods).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeguard", description="Keep safety alignment while fine-tuning.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, default=None):
        sp.add_argument("--model", required=default is None, default=default,
                        help="HF hub id, local folder, a built-in name (smollm2-135m-instruct, "
                             "qwen2.5-coder-0.5b-instruct) or 'tiny'")
        sp.add_argument("--gguf-file", help="GGUF file inside --model's folder (or an absolute path)")
        sp.add_argument("--dtype", choices=list(_DTYPES), default="float32")

    c = sub.add_parser("calibrate", help="compute the artifact (refusal directions, ...) for a model")
    model_args(c, default="")
    c.add_argument("--out", help="artifact folder to write (atomically)")
    c.add_argument("--axolotl-config", help="take the model and artifact path from an Axolotl YAML (Axolotl env)")
    c.add_argument("--harmful", default="harmful", help="shipped set name, JSONL/CSV path or HF dataset id")
    c.add_argument("--harmless", default="harmless", help="shipped set name, JSONL/CSV path or HF dataset id")
    c.add_argument("--constraints", help="comma-separated constraints to calibrate for (default: all registered)")
    c.add_argument("--limit", type=int, help="use at most this many prompts of each set")
    c.add_argument("--config", help="safeguard YAML: calibrate its constraints with their calibration options")
    c.add_argument("--base-model", help="pre-alignment checkpoint of --model (cwac's alignment-delta subspace)")
    c.add_argument("--batch-size", type=int, default=16)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="refusal rate (keyword judge) and refusal score on prompt sets")
    model_args(e)
    e.add_argument("--adapter", help="PEFT adapter folder to load on top of --model")
    e.add_argument("--prompts", nargs="+", default=["harmful", "harmless"],
                   help="shipped set names (harmful, harmless, borderline), JSONL/CSV paths or HF dataset ids")
    e.add_argument("--split", choices=["heldout", "train", "all"], default="heldout")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", default="safeguard-eval")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="harmful fine-tuning benchmark: base vs plain SFT vs each constraint")
    b.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="built-in name, HF hub id, local folder, or 'tiny' (with --profile smoke)")
    b.add_argument("--profile", choices=["cpu-small", "paper", "smoke"], default="cpu-small")
    b.add_argument("--ratios", help="comma-separated harmful ratios, e.g. 0,0.1,0.2 (default: the profile's)")
    b.add_argument("--methods", help="comma-separated subset of: base, sft, <constraint rows>, all")
    b.add_argument("--out", help="results folder (default results/<profile>-<model>); rerun to resume")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="print what an artifact holds")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="end-to-end demo: calibrate, fine-tune with/without ProCon, evaluate")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--out", default="demo-out")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        from .artifacts import ArtifactError
        from .config import ConfigError

        if isinstance(err, (ArtifactError, ConfigError)) or not isinstance(err, RuntimeError):
            print(f"safeguard {args.cmd}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
