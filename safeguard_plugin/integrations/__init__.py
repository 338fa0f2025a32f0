"""Thin adapters from framework events to :class:`safeguard_plugin.SafeguardEngine` calls.

Import them as ``safeguard_plugin.integrations.<name>`` (``trl`` covers any transformers ``Trainer``).
"""
