"""Calibrate the artifact an Axolotl YAML asks for, outside a training run.

``calibrate_from_axolotl_config("train.yaml")`` loads the config, tokenizer and model exactly as ``axolotl train``
does (same chat template, added tokens, dtype), so the artifact's fingerprint matches the run that will use it.
Exposed as ``axolotl safeguard calibrate train.yaml`` (see ``cli.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from safeguard_plugin.config import ConfigError


def calibrate_from_axolotl_config(config: str | os.PathLike, **overrides) -> Path:
    """Compute ``safeguard.artifact`` of an Axolotl YAML if it is missing; return the artifact folder.

    ``overrides`` are Axolotl config overrides, as ``axolotl train x.yaml --key value`` takes them. The model is
    loaded without the YAML's ``deepspeed:`` (so a ZeRO-3 YAML can be calibrated as it is). An existing
    artifact is kept (delete the folder to recompute). Relative paths resolve against the working directory,
    as in ``axolotl train``.
    """
    # load_cfg validates the config: the guard refuses a `safeguard:` block without the plugin
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import ModelLoader, load_tokenizer

    from .plugin import LOG, _artifact_ready, ensure_artifact, safeguard_block

    # without DeepSpeed unless asked: ZeRO-3 would partition the model while it loads (nothing to calibrate on), and
    # DeepSpeed does not change the loaded weights, dtype or tokenizer, so the fingerprint is the training run's
    overrides.setdefault("deepspeed", None)
    cfg = load_cfg(str(config), **overrides)
    sg = safeguard_block(cfg)
    if sg is None:
        raise ConfigError(f"{config}: no `safeguard:` block, nothing to calibrate")
    if not sg.artifact:
        raise ConfigError(f"{config}: safeguard.artifact is not set; give the folder to write the artifact to")
    path = Path(sg.artifact)
    if _artifact_ready(path, sg):
        LOG.info("safeguard: artifact %s already holds what this block needs (`safeguard calibrate --recompute` "
                 "redoes it)", path)
        return path
    tokenizer = load_tokenizer(cfg)
    # the plugin's post_model_load hook calibrates the loaded model (adapters disabled) as in a training run
    model, _ = ModelLoader(cfg, tokenizer).load()
    if not _artifact_ready(path, sg):  # defensive: the hook did not run (plugin registered under another name?)
        ensure_artifact(cfg, sg, model, tokenizer)
    return path
