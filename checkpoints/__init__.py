"""Checkpoints and export: what a run leaves behind that another process can load safely."""

from recipebox.checkpoints.export import export_hf

__all__ = ["export_hf"]
