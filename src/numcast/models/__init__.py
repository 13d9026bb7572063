"""Adapters for real pretrained models that ship inside installable packages (no hub downloads)."""
