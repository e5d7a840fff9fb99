"""Backends: one small interface (runtime/backends/base.py), one file per implementation."""
