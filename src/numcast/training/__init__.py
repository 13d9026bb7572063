"""Quantization-aware training (numcast's own small loops)."""
