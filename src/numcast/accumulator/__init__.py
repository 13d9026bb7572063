"""Accumulator-aware quantization support: closed-form accumulator bounds and an integer-exact simulator."""
