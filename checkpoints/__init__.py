"""Checkpoints and export: what a run leaves behind that another process can load safely."""

from checkpoints.export import export_hf

__all__ = ["export_hf"]
