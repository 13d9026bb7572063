"""Accumulator-aware QAT on the Fashion-MNIST CNN, numcast and Brevitas side by side (issue: A2Q / A2Q+).

    .venv/bin/python benchmarks/accumulator.py [--ps 20 18 16 15 14 13 12] [--rules a2q a2q+]
        [--libraries numcast brevitas] [--steps 150] [--epochs 1] [--json benchmarks/results/accumulator.json]
        [--plot benchmarks/results/accumulator.png] [--update] [--markdown]

W4A4: every conv and the classifier get 4-bit per-channel weights under the budget of a P-bit accumulator
(A2Q or A2Q+) and 4-bit inputs with one static scale per tensor (unsigned after ReLUs; the first layer's input,
the image, 8-bit signed); batch norm stays in float. Both libraries start from the same float checkpoint
(``load_fmnist_cnn``), apply EP-init, calibrate their activation scales on the same 512 training images and then
freeze them ("frozen scales": only weights, weight scales and norms, biases and batch norm train), and run the
same training loop (:func:`numcast.training.qat.train_qat`: Adam lr 1e-3, cosine schedule, batch 128, seed 0,
regulariser 1e-3·Σ ReLU(g − s·T), the same batches) — the only difference is whose layers compute the forward
and backward. Brevitas: ``Int8AccumulatorAwareWeightQuant`` / ``Int8AccumulatorAwareZeroCenterWeightQuant``
with ``weight_bit_width=4``, ``weight_accumulator_bit_width=P``, ``Int8ActPerTensorFloat`` /
``Uint8ActPerTensorFloat`` inputs, its own ``apply_ep_init`` and its own regulariser terms.

Per row: top-1 on the 10,000 test images, QAT seconds per epoch (``--steps`` steps), and the guarantee check:
the largest exact accumulator width any channel of any layer needs for its integer weights and input type
(must be ≤ P). ``numcast-ptq`` rows are numcast's A2Q/A2Q+ model right after EP-init and calibration, before
any training (the QAT starting point; A2Q+ zero-centres, so without training it is far from float).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from numcast.accumulator.bounds import min_accumulator_bits
from numcast.evaluate.vision import accuracy
from numcast.models.fashion_mnist import load_fashion_mnist
from numcast.models.fmnist_cnn import load_fmnist_cnn
from numcast.nn.a2q import A2QConv2d, A2QLinear
from numcast.nn.observe import observe_inputs
from numcast.training.qat import QATConfig, prepare_a2q, train_qat

PS = [20, 18, 16, 15, 14, 13, 12]
FIRST_INPUT_BITS = 8


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def numcast_model(float_model, calib, P, rule):
    return prepare_a2q(float_model, calib, weight_bits=4, input_bits=4, accumulator_bits=P, rule=rule,
                       first_input_bits=FIRST_INPUT_BITS, observer="percentile")  # fmt: skip


def numcast_needs(model) -> int:
    need = 0
    for m in model.modules():
        if isinstance(m, (A2QConv2d, A2QLinear)):
            wq = m.weight_quant
            q = wq.integer_weights().detach().long()
            need = max(need, int(min_accumulator_bits(q, wq.input_bits, wq.input_signed, "exact").max()))
    return need


# ------------------------------------------------------------------------------------------------ Brevitas
def brevitas_model(float_model, calib, P, rule):
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.nn import QuantConv2d, QuantLinear
    from brevitas.quant import (
        Int8AccumulatorAwareWeightQuant,
        Int8AccumulatorAwareZeroCenterWeightQuant,
        Int8ActPerTensorFloat,
        Uint8ActPerTensorFloat,
    )
    from brevitas_examples.imagenet_classification.a2q.ep_init import apply_ep_init

    from numcast.nn.surgery import set_module

    wq = Int8AccumulatorAwareZeroCenterWeightQuant if rule == "a2q+" else Int8AccumulatorAwareWeightQuant
    model = copy.deepcopy(float_model).eval()
    stats = observe_inputs(dict(_layers(model)), lambda: model(calib[:256]))
    with torch.random.fork_rng(devices=[]):  # Brevitas layers draw initial weights; then the float ones load
        for i, (name, m) in enumerate(_layers(model)):
            bits = FIRST_INPUT_BITS if i == 0 else 4
            aq = Uint8ActPerTensorFloat if stats[name].nonnegative else Int8ActPerTensorFloat
            kw = dict(weight_quant=wq, weight_bit_width=4, weight_accumulator_bit_width=P, input_quant=aq,
                      input_bit_width=bits)  # fmt: skip
            if isinstance(m, nn.Conv2d):
                new = QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                  m.groups, bias=m.bias is not None, **kw)  # fmt: skip
            else:
                new = QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
            new.load_state_dict(m.state_dict(), strict=False)  # re-initialises scales and norms from the weights
            set_module(model, name, new)
    with torch.no_grad(), calibration_mode(model):
        for i in range(0, calib.shape[0], 256):
            model(calib[i : i + 256])
    apply_ep_init(model, calib[:1])
    for n, p in model.named_parameters():
        if "input_quant" in n:  # frozen activation scales, as numcast's static ones
            p.requires_grad_(False)
    return model


class BrevitasPenalty:
    """Σ ReLU(g − s·T) over Brevitas' accumulator-aware pre-scaling modules, gathered by forward hooks (the
    formula of Brevitas' A2Q example, through its own modules)."""

    def __init__(self, model):
        from brevitas.core.scaling import AccumulatorAwareParameterPreScaling
        from brevitas.function.ops_ste import abs_binary_sign_grad

        self.terms = []

        def hook(module, inp, _out):
            weights, bit_width, signed = inp
            s = module.scaling_impl(weights)
            g = abs_binary_sign_grad(module.restrict_clamp_scaling(module.value))
            T = module.calc_max_l1_norm(bit_width, signed)
            self.terms.append(torch.relu(g - T * s).sum())

        for m in model.modules():
            if isinstance(m, AccumulatorAwareParameterPreScaling):
                m.register_forward_hook(hook)

    def __call__(self, _model) -> torch.Tensor:
        out = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return out


def brevitas_needs(model, calib) -> int:
    """Exact accumulator bits of the integer weights Brevitas' quantizers produce, per layer input type."""
    from brevitas.nn import QuantConv2d, QuantLinear

    need = 0
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                bits = float(m.input_quant.bit_width())
                signed = bool(m.input_quant.is_signed)
                out = m.weight_quant.tensor_quant(m.weight, torch.tensor(bits), signed)
                q = (out[0] / out[1]).round().reshape(m.weight.shape[0], -1).long()
                need = max(need, int(min_accumulator_bits(q, int(bits), signed, "exact").max()))
    return need


# ------------------------------------------------------------------------------------------------ driver
def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(args.seed)
    calib = train_x[torch.randperm(train_x.shape[0], generator=g)[: args.calibration]]
    float_model = load_fmnist_cnn()
    rows = [{"library": "float", "rule": "-", "P": None, "top1": accuracy(float_model, test_x, test_y)}]
    print(f"float top-1 {rows[0]['top1']:.4f}", flush=True)
    cfg = QATConfig(epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, progress=not args.no_progress)  # fmt: skip
    for rule in args.rules:
        for P in args.ps:
            m = numcast_model(float_model, calib, P, rule)
            rows.append({"library": "numcast-ptq", "rule": rule, "P": P, "top1": accuracy(m, test_x, test_y),
                         "max_bits_needed": numcast_needs(m)})  # fmt: skip
            for lib in args.libraries:
                t0 = time.perf_counter()
                if lib == "numcast":
                    m = numcast_model(float_model, calib, P, rule)
                    prep = time.perf_counter() - t0
                    res = train_qat(m, train_x, train_y, cfg)
                    need = numcast_needs(m)
                else:
                    m = brevitas_model(float_model, calib, P, rule)
                    prep = time.perf_counter() - t0
                    res = train_qat(m, train_x, train_y, cfg, penalty=BrevitasPenalty(m))
                    need = brevitas_needs(m, calib)
                row = {"library": lib, "rule": rule, "P": P, "top1": accuracy(m, test_x, test_y),
                       "max_bits_needed": need, "guarantee_holds": need <= P, "prepare_s": prep,
                       "qat_s_per_epoch": sum(res.epoch_seconds) / len(res.epoch_seconds),
                       "steps_per_epoch": args.steps, "epochs": args.epochs, "final_loss": res.losses[-1]}  # fmt: skip
                rows.append(row)
                print(f"{lib:9s} {rule:5s} P={P:2d}: top-1 {row['top1']:.4f}, needs {need} bits, "
                      f"{row['qat_s_per_epoch']:.1f} s/epoch", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    fl = next((r["top1"] for r in rows if r["library"] == "float"), None)
    keys = sorted({(r["rule"], r["P"]) for r in rows if r["P"] is not None}, key=lambda k: (k[0], -k[1]))
    libs = ["numcast-ptq", "numcast", "brevitas"]
    head = ("| rule | P | EP-init, before QAT (numcast) | numcast QAT | Brevitas QAT | numcast s/epoch "
            "| Brevitas s/epoch | max bits needed (numcast / Brevitas) |")  # fmt: skip
    lines = [f"float top-1: {100 * fl:.2f} %" if fl is not None else "", "", head, "|" + "---|" * 8]
    by = {(r["library"], r["rule"], r["P"]): r for r in rows}
    for rule, P in keys:
        cells = [by.get((lib, rule, P)) for lib in libs]
        acc = [f"{100 * c['top1']:.2f}" if c else "-" for c in cells]
        sec = [f"{c['qat_s_per_epoch']:.1f}" if c else "-" for c in cells[1:]]
        need = [str(c["max_bits_needed"]) if c else "-" for c in cells[1:]]
        lines.append(f"| {rule} | {P} | {acc[0]} | {acc[1]} | {acc[2]} | {sec[0]} | {sec[1]} | {' / '.join(need)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"numcast": "-", "brevitas": "--", "numcast-ptq": ":"}
    colors = {"a2q": "#e69138", "a2q+": "#3b6ea5"}
    for lib, ls in styles.items():
        for rule, c in colors.items():
            pts = sorted((r["P"], 100 * r["top1"]) for r in rows if r["library"] == lib and r["rule"] == rule)
            if pts:
                label = {"numcast-ptq": "EP-init only"}.get(lib, lib)
                ax.plot([p for p, _ in pts], [a for _, a in pts], ls, marker="o", color=c, label=f"{label} {rule}")
    fl = next((r["top1"] for r in rows if r["library"] == "float"), None)
    if fl is not None:
        ax.axhline(100 * fl, color="black", linewidth=0.8, label="float")
    ax.set_xlabel("accumulator bits P")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fashion-MNIST CNN, W4A4, accumulator-aware QAT", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ps", type=int, nargs="+", default=PS)
    ap.add_argument("--rules", nargs="+", default=["a2q", "a2q+"], choices=["a2q", "a2q+"])
    ap.add_argument("--libraries", nargs="+", default=["numcast", "brevitas"], choices=["numcast", "brevitas"])
    ap.add_argument("--steps", type=int, default=150, help="QAT steps per epoch (469 = one pass)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/accumulator.json")
    ap.add_argument("--plot", default="benchmarks/results/accumulator.png")
    ap.add_argument("--update", action="store_true", help="merge into an existing --json (by library, rule, P)")
    ap.add_argument("--markdown", action="store_true", help="only print the table of the saved --json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.json)
    if args.markdown:
        print(markdown(json.loads(path.read_text())["rows"]))
        return 0
    rows = run(args)
    if args.update and path.is_file():
        old = json.loads(path.read_text())["rows"]
        keys = {(r["library"], r["rule"], r["P"]) for r in rows}
        rows = [r for r in old if (r["library"], r["rule"], r["P"]) not in keys] + rows
    meta = {k: getattr(args, k) for k in ("steps", "epochs", "batch_size", "lr", "calibration", "seed", "threads")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": meta, "torch": torch.__version__, "rows": rows}, indent=2))
    plot(rows, Path(args.plot))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
