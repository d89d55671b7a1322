"""Adapters that plug a compiled guidekit plan into other libraries' samplers.

Installed as ``guidekit.adapters``; each adapter imports its library lazily.
"""
