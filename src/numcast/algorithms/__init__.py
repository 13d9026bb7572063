"""Weight solvers, one file each, functions of tensors: ``(weight, inputs..., format) -> QTensor``."""
