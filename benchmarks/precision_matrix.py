"""The observed errors behind tests/test_precision.py's tolerances: per precision × LoRA/full × constraint, the relative
L2 error vs fp32 of the gradients and of the penalty's effect on them, the post-step leak and its bound, and the fp16
steps the scaler skipped. Same one-step runs as the test (its ``Cells``), printed as a table.

Usage (repository root): ``python benchmarks/precision_matrix.py [--artifact DIR]`` (~2 min on 2 CPU cores plus a
~1 min calibration of a tiny artifact when none is given).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_precision as T  # noqa: E402

from safeguard_plugin.calibration import calibrate  # noqa: E402
from safeguard_plugin.data import load_prompts  # noqa: E402
from safeguard_plugin.testing import tiny_model, tiny_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="an artifact of tiny_model() for every constraint (default: calibrate one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
             "completion": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} for a in (0,) for b in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        art = args.artifact
        if art is None:
            art = f"{tmp}/art"
            calibrate(tiny_model(), tok, load_prompts("harmful", limit=64), load_prompts("harmless", limit=64), art,
                      model_id="tiny", constraints="all", progress=False)
        cells = T.Cells(tok, rows, art)
        print("| precision | mode | constraint | grad err vs fp32 | effect err vs fp32 | leak (bound) | fp16 skipped |")
        print("|---|---|---|---|---|---|---|")
        for p in T.PRECISIONS[1:]:
            for mode in ("lora", "full"):
                for name in T.CONSTRAINTS:
                    if mode == "full" and name in T.LORA_ONLY:
                        continue
                    ref, cell = cells.get("fp32", mode, name), cells.get(p, mode, name)
                    keys = sorted(ref["grads"])
                    g, g32 = T._flat(cell["grads"], keys), T._flat(ref["grads"], keys)
                    effect = "–"
                    if name not in ("guardspace", "monitor"):
                        e = g - T._flat(cells.get(p, mode, None)["grads"], keys)
                        e32 = g32 - T._flat(cells.get("fp32", mode, None)["grads"], keys)
                        effect = f"{T._rel(e, e32):.3g}"
                    leak = "–" if cell["leak"] is None else f"{cell['leak']:.2g} ({cell['leak_bound']:.2g})"
                    print(f"| {p} | {mode} | {name} | {T._rel(g, g32):.3g} | {effect} | {leak} | {cell['skipped']} |",
                          flush=True)


if __name__ == "__main__":
    main()
