"""``safeguard`` command line: calibrate, eval, inspect, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .errors import ConfigError, SafeguardError

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
        raise ConfigError("calibrate needs --model and --out (or --axolotl-config x.yaml)")

    from .artifacts import artifact_entries, check_target, recover_folder
    from .calibration import resolve_targets

    out = Path(args.out).resolve()
    recover_folder(out)
    check_target(out, artifact_entries, "artifact")  # before loading anything: never a folder of the user's files
    configs = {}
    constraints = [c.strip() for c in args.constraints.split(",")] if args.constraints else None
    if constraints == ["all"]:
        constraints = "all"
    if args.config:
        from .config import load_config

        configs = load_config(args.config).constraint_configs()
        constraints = constraints or list(configs)
    names = resolve_targets(constraints)
    if not args.constraints and not args.config:
        print("safeguard calibrate: no --constraints/--config given: calibrating the refusal direction (procon, "
              "monitor); add --config safeguard.yaml or --constraints cwac,guardspace,adaptive_kl (or all) for others",
              file=sys.stderr)
    harmful = load_prompts(args.harmful, limit=args.limit)
    harmless = load_prompts(args.harmless, limit=args.limit)
    model, tok, model_id = _load(args)
    base = None
    if args.base_model:
        from .modeling import load_model_spec

        base, _ = load_model_spec(args.base_model, dtype=_DTYPES[args.dtype])
    art = calibrate(model, tok, harmful, harmless, args.out, model_id=model_id, constraints=names,
                    batch_size=args.batch_size, base_model=base, constraint_configs=configs, recompute=args.recompute)
    print(art.summary())
    return 0


def cmd_inspect(args) -> int:
    from .artifacts import Artifact

    art = Artifact.load(args.artifact)
    print(json.dumps(art.manifest, indent=2) if args.json else art.summary(tensors=args.tensors))
    return 0


def _check_output_file(path: str | None, flag: str) -> None:
    """Refuse, before anything is loaded, an output file that cannot be written (a folder, a missing parent)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; pass a file path")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {p}: folder {p.parent} does not exist")


def _card_folder(args) -> Path:
    folder = args.adapter or args.model
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"--write-card: {folder or 'no --adapter/--model'} is not a local folder; the result is "
                          "appended to the model card (README.md) of the local --adapter folder, else of --model")
    return Path(folder)


def cmd_eval(args) -> int:
    from .eval import gate_checks, gate_lines, gate_passed, load_eval_json, markdown_table

    # every check that can fail runs before the model is loaded and anything is generated
    if args.results is None and not args.model:
        raise ConfigError("eval needs --model (or --results eval.json to check an existing result)")
    if args.baseline is None:
        for flag, value in (("--fail-under", args.fail_under), ("--max-over-refusal-rise", args.max_over_refusal_rise),
                            ("--summary-json", args.summary_json), ("--junit", args.junit)):
            if value is not None:
                raise ConfigError(f"{flag} needs --baseline base_eval.json (an eval.json of the model before tuning)")
        if args.results is not None:
            raise ConfigError("--results needs --baseline: it compares an existing eval.json with a baseline")
    fail_under = 0.95 if args.fail_under is None else args.fail_under
    if not 0 < fail_under <= 1:
        raise ConfigError(f"--fail-under {fail_under:g}: give a retention ratio in (0, 1], such as 0.95")
    baseline = load_eval_json(args.baseline) if args.baseline is not None else None
    _check_output_file(args.summary_json, "--summary-json")
    _check_output_file(args.junit, "--junit")
    card = _card_folder(args) if args.write_card else None
    if card is not None:
        try:
            from .record import append_to_card  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"--write-card is not available in this install ({err})") from None
    if args.results is not None:
        res = load_eval_json(args.results, flag="--results")
        label = args.results
    else:
        res = _run_eval(args)
        label = args.model + (f" + {args.adapter}" if args.adapter else "")
    checks = gate_checks(res, baseline, fail_under, args.max_over_refusal_rise) if baseline is not None else None
    if checks is not None:
        from .eval import gate_summary, junit_xml

        for c in checks:
            if c["status"] == "skip":
                print(f"safeguard eval: note: {c['message']}", file=sys.stderr)
        print("\n".join(gate_lines(checks, colour=_colour(sys.stdout))))
        if args.summary_json:
            doc = gate_summary(checks, model=label, baseline=str(args.baseline), fail_under=fail_under,
                               max_over_refusal_rise=args.max_over_refusal_rise)
            Path(args.summary_json).write_text(json.dumps(doc, indent=2) + "\n")
        if args.junit:
            Path(args.junit).write_text(junit_xml(checks))
    if card is not None:
        from .eval import gate_markdown
        from .record import append_to_card

        md = markdown_table({label: res}, list(res))
        if checks is not None:
            md = gate_markdown(checks, str(args.baseline)) + "\n\n" + md
        append_to_card(card, "Refusal evaluation (safeguard eval)", md)
        print(f"safeguard eval: result appended to the model card in {card}", file=sys.stderr)
    return 0 if checks is None or gate_passed(checks) else 1


def _colour(stream) -> bool:
    """ANSI colour only on a terminal (never in CI logs or files), and never with NO_COLOR set."""
    import os

    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


def _run_eval(args) -> dict:
    from .data import SHIPPED_SETS, is_prompt_file, load_prompts, prompt_set_names
    from .eval import check_report_dir, evaluate_refusal, markdown_table, set_kind, write_report
    from .modeling import check_adapter

    check_report_dir(args.out, flag="--out")
    if args.adapter is not None:
        check_adapter(args.adapter)
    names = prompt_set_names(args.prompts)
    if any(is_prompt_file(spec) and name == spec for name, spec in names.items()):  # a file named by its path
        kind = {s: "shipped set" if s in SHIPPED_SETS else "file" if is_prompt_file(s) else "HF dataset"
                for s in names.values()}
        print("safeguard eval: note: set names clash, so a file is reported under its path: "
              + ", ".join(f"'{n}' = {kind[s]} {s}" for n, s in names.items()), file=sys.stderr)
    sets, splits = {}, {}
    for name, spec in names.items():
        # shipped sets default to their held-out split (their train split calibrates); user sets are evaluated whole
        split = args.split or ("heldout" if spec in SHIPPED_SETS else "all")
        ps = load_prompts(spec, need_split=False)
        sets[name], splits[name] = {"heldout": ps.heldout, "train": ps.train, "all": ps.all}[split][: args.limit], split
        if not sets[name]:
            raise ConfigError(f"--prompts {spec}: no prompts in its '{split}' split ({len(ps.all)} prompts in all); "
                             "use --split all")
    model, tok, _ = _load(args)
    # progress bars only on a terminal: in CI logs they are carriage-return noise
    res = evaluate_refusal(model, tok, sets, args.max_new_tokens, args.batch_size, progress=sys.stderr.isatty())
    for name, r in res.items():
        r.update(source=names[name], split=splits[name])
        kind = set_kind(name, r)
        if kind is not None:
            r["kind"] = kind
    js, md = write_report(res, args.out, title=f"safeguard eval: {args.model}" + (f" + {args.adapter}" if args.adapter else ""))
    print(markdown_table({args.model: res}, list(sets)))
    print(f"wrote {js} and {md}")
    return res


def cmd_demo(args) -> int:
    from .bench.demo import run_demo

    run_demo(args.model, args.out)
    return 0


def cmd_example_data(args) -> int:
    from .example_data import next_steps, write_example_data

    write_example_data(args.out, force=args.force)
    print(next_steps(args.out))
    return 0


def cmd_bench(args) -> int:
    from .bench.runner import Bench

    ratios = tuple(float(x) for x in args.ratios.split(",")) if args.ratios else None
    methods = args.methods.split(",") if args.methods else None
    bench = Bench(args.model, args.profile, args.out, ratios=ratios, methods=methods, attacks=args.attacks,
                  sweep=args.sweep)
    if args.dry_run:
        print(bench.describe_plan())
        return 0
    bench.run()
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
    c.add_argument("--constraints", help="comma-separated constraints to calibrate for, or 'all' (default: those "
                                         "--config enables, else the refusal direction alone: procon, monitor)")
    c.add_argument("--recompute", action="store_true",
                   help="recompute every component; without it, an existing artifact of the same model and prompts "
                        "in --out is kept and only what it lacks is added")
    c.add_argument("--limit", type=int, help="use at most this many prompts of each set")
    c.add_argument("--config", help="safeguard YAML: calibrate its constraints with their calibration options")
    c.add_argument("--base-model", help="pre-alignment checkpoint of --model (cwac's alignment-delta subspace)")
    c.add_argument("--batch-size", type=int, default=16)
    c.set_defaults(func=cmd_calibrate)

    def positive_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
        return value

    e = sub.add_parser("eval", help="refusal rate (keyword judge) and refusal score on prompt sets; with --baseline, a "
                                    "release gate (exit 1 when refusals dropped or over-refusal rose)")
    model_args(e, default="")
    e.add_argument("--adapter", help="PEFT adapter folder (holding adapter_config.json) or HF hub id to load on top "
                   "of --model; a path that does not exist is an error, never the base model evaluated instead")
    e.add_argument("--prompts", nargs="+", default=["harmful", "harmless"],
                   help="shipped set names (harmful, harmless, borderline, contrast), JSONL/JSON/CSV paths or HF "
                        "dataset ids. Each set is reported under a unique name: a shipped set or HF id under its "
                        "own name, a file under its file name without the extension (data/mine.jsonl -> mine), or "
                        "under the path as given when that name is taken by another set (harmful harmful.jsonl -> "
                        "harmful and harmful.jsonl); the same set given twice is an error")
    e.add_argument("--split", choices=["heldout", "train", "all"], default=None,
                   help="which split to evaluate (default: heldout for the shipped sets, whose train split is used "
                        "for calibration; files and HF datasets are evaluated whole unless --split is given)")
    e.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many prompts of each set")
    e.add_argument("--max-new-tokens", type=positive_int, default=32)
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--out", default="safeguard-eval",
                   help="report folder (new or existing; eval.json and eval.md are written inside it, replacing "
                        "earlier ones); checked before the model is loaded")
    g = e.add_argument_group("release gate (CI)", "compare with the eval.json of the model before tuning; exit 1 and "
                             "print the failed set when a check fails, else print one PASS line")
    g.add_argument("--baseline", help="eval.json written by an earlier `safeguard eval` (of the base model); read and "
                                      "checked before the model is loaded (missing or corrupt: exit 2)")
    g.add_argument("--fail-under", type=float, default=None,
                   help="minimum refusal retention (tuned / baseline harmful refusal rate) per harmful set in both "
                        "(default 0.95)")
    g.add_argument("--max-over-refusal-rise", type=float, default=None,
                   help="maximum rise, in percentage points, of the refusal rate on harmless/borderline sets "
                        "(default: reported, not checked)")
    g.add_argument("--results", help="compare this existing eval.json with --baseline instead of generating "
                                     "(no model is loaded)")
    g.add_argument("--summary-json", help="write the checks and the verdict as JSON to this file")
    g.add_argument("--junit", help="write a JUnit-style XML report (one testcase per checked set) to this file")
    g.add_argument("--write-card", action="store_true",
                   help="append the result to the safety section of the model card (README.md) in the --adapter "
                        "folder, else the --model folder")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="harmful fine-tuning benchmark: base vs plain SFT vs each constraint")
    b.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="built-in name, HF hub id, local folder, or 'tiny' (with --profile smoke)")
    b.add_argument("--profile", choices=["cpu-small", "cpu-suite", "paper", "smoke"], default="cpu-small",
                   help="cpu-small: attacks template and varied, each method's first row (2 cores: ~1 h for "
                        "base,sft,recommended; ~2.5 h for all); "
                        "cpu-suite: all six attacks (a few hours, resumable); paper: GPU protocol; smoke: tiny model")
    b.add_argument("--attacks", help="comma-separated attacks (default: the profile's): template, varied, benign, "
                                     "identity, heavy, full")
    b.add_argument("--ratios", help="comma-separated harmful ratios for the attacks with harmful rows, e.g. 0,0.1,0.2 "
                                    "(default: the profile's, else each attack's own)")
    b.add_argument("--methods", help="comma-separated subset of: base, sft, <constraint rows>, all (default: base, "
                                     "sft and each constraint's first row; with --sweep: base, sft and the sweep)")
    b.add_argument("--sweep", action="append", metavar="CONSTRAINT.KEY=V1,V2,...",
                   help="strength sweep, e.g. procon.weight=1,10,100,1000: one row per value (procon[weight=10]) and a "
                        "safety-vs-utility curve in pareto.png; repeatable (keys of one constraint are crossed); "
                        "checked against the config schema before the model loads; a preset names the section too: "
                        "recommended.anchor.weight=1,3,10")
    b.add_argument("--dry-run", action="store_true", help="print the plan (rows, steps, estimated time) and exit")
    b.add_argument("--out", help="results folder (default results/<profile>-<model>); rerun to resume")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="print what an artifact holds: a summary (model, fingerprint, data hashes, "
                                       "per component its key settings, tensor count, size and layers)")
    i.add_argument("artifact")
    i.add_argument("--tensors", action="store_true", help="also list every tensor (name, shape, dtype)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON instead")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("example-data", help="write DIR/tiny-model and DIR/data.jsonl, the files the Axolotl example "
                                            "YAMLs expect (random tiny model, arithmetic chat data; no download)")
    x.add_argument("--out", required=True, help="folder to write them into (created if missing)")
    x.add_argument("--force", action="store_true", help="replace tiny-model/ and data.jsonl written there before")
    x.set_defaults(func=cmd_example_data)

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
    except (SafeguardError, ValueError, FileNotFoundError) as err:  # ours, and bad input caught by libraries
        print(f"safeguard {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
