"""Tooling around the plugin, not needed to train with it: the harmful fine-tuning benchmark (``runner``), its data
(``datasets``), training recipes, the report with its plots, the end-to-end demo and the pinned model assets.

Its third-party needs (matplotlib for plots, gguf for the GGUF model assets, psutil for memory figures) come with the
``bench`` extra: ``pip install "safeguard-plugin[bench]"``.
"""
