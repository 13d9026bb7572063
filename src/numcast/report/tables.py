"""Rich tables for formats and cast statistics (the CLI and the README both print these)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table

from numcast.formats.spec import Format


def fmt_num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if v != v or abs(v) == float("inf"):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def make_table(title: str, columns: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(fmt_num(v, digits) for v in r))
    return t


FORMAT_COLUMNS = ("name", "bits/value", "max", "min normal", "min subnormal", "mantissa bits", "block", "scale")


def format_rows(formats: Iterable[Format]) -> list[list]:
    rows = []
    for f in formats:
        d = f.figures()
        scale = d["scale_format"] or "-"
        if d["scale_format"]:
            scale += f" ({d['granularity']}, {d['scale_rule']})"
            if d["tensor_scale"]:
                scale += " x fp32 tensor"
            if d["zero_point"]:
                scale += " + zero point"
        rows.append([d["name"], d["bits_per_value"], d["max"], d["min_normal"], d["min_subnormal"],
                     d["mantissa_bits"], d["block_size"], scale])  # fmt: skip
    return rows


def formats_table(formats: Iterable[Format]) -> Table:
    return make_table("numcast formats (element units; scales multiply them)", FORMAT_COLUMNS, format_rows(formats))


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> str:
    def cell(v) -> str:
        return fmt_num(v, digits).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def formats_markdown(formats: Iterable[Format]) -> str:
    return markdown_table(FORMAT_COLUMNS, format_rows(formats))


STATS_COLUMNS = ("format", "bits/value", "packed bytes", "SQNR dB", "MSE", "max |err|", "saturated", "flushed to 0",
                 "NaN/inf in", "NaN/inf out")  # fmt: skip


def stats_row(s: dict) -> list:
    return [s["format"], s.get("bits_per_value"), s.get("packed_bytes"), s["sqnr_db"], s["mse"], s["max_abs_err"],
            f"{100 * s['frac_saturated']:.3f}%", f"{100 * s['frac_flushed_to_zero']:.3f}%",
            f"{s['nan_in']}/{s['inf_in']}", f"{s['nan_out']}/{s['inf_out']}"]  # fmt: skip


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console(width=200)).print(table)
