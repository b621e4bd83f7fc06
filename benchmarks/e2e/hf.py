"""The transformers systems: plain transformers with every weight in memory (the floor every system's tokens
are checked against) and ``accelerate-disk`` (transformers with an explicit Accelerate ``device_map`` that
puts the routed experts of the layers beyond the budget on "disk").

transformers 5 keeps a layer's experts as one fused tensor pair, so Accelerate can only offload whole layers'
experts: it keeps floor(budget x layers) layers' experts resident. Offloaded tensors are memory-mapped from the
offload folder; their pages are dropped from the page cache (fsync + ``posix_fadvise(DONTNEED)``) before
every forward step, so each step really reads the storage.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path


class _Steps:
    """A StoppingCriteria that only records when each step's tokens exist (as the engine's executor does)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kw):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _trim(row: list[int], eos) -> list[int]:
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def _drop_pages(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _expert_modules(model) -> list[str]:
    """Names of the modules holding a layer's routed experts (fused or a ModuleList), in layer order."""
    return [
        n
        for n, m in model.named_modules()
        if n.endswith(".mlp.experts") and any(True for _ in m.parameters())
    ]


def _device_map(model_dir: str, resident: float, exec_device) -> tuple[dict, int, int]:
    """An explicit device_map: every module with weights on ``exec_device``, except the experts of the layers
    beyond floor(resident x MoE layers), which go to "disk"."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    experts = _expert_modules(meta)
    keep = math.floor(resident * len(experts) + 1e-9)
    offload = set(experts[keep:])
    dm = {}
    for name, mod in meta.named_modules():
        if any(name == o or name.startswith(o + ".") for o in offload):
            if name in offload:
                dm[name] = "disk"
            continue
        if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            dm[name] = exec_device
    return dm, keep, len(experts)


class _ExpertUse:
    """Counts the bytes of the routed experts a model uses: per forward step and MoE layer, the distinct
    experts that received tokens (what any offloading system must have in memory for that step)."""

    def __init__(self, model):
        self.active, self.bytes_used = False, 0
        for name in _expert_modules(model):
            mod = model.get_submodule(name)
            n = getattr(mod, "num_experts", None) or len(mod)
            per = sum(p.numel() * p.element_size() for p in mod.parameters()) / n
            mod.register_forward_pre_hook(self._hook(per), with_kwargs=True)

    def _hook(self, per_expert: float):
        def hook(mod, args, kwargs):
            if self.active:
                idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                self.bytes_used += int(idx.unique().numel() * per_expert)

        return hook


def run_hf(spec: dict, bytes_read=lambda: None) -> dict:
    """Load the checkpoint as ``spec["system"]`` says, warm up, then measure ``spec["prompts"]``
    (``bytes_read``: the disk bytes counter read around the measured generation). Blocks."""
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteriaList

    from zipmoe_ray.models.hf import quiet_transformers

    device = spec["device"]
    t0 = time.perf_counter()
    offload_dir = None
    extra: dict = {}
    with quiet_transformers():
        if spec["system"] == "transformers":
            model = (
                AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16).eval().to(device)
            )
        else:
            exec_device = 0 if device.startswith("cuda") else "cpu"
            dm, keep, n = _device_map(spec["model"], spec["budget_frac"], exec_device)
            offload_dir = spec["offload_dir"]
            shutil.rmtree(offload_dir, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(
                spec["model"], dtype=torch.bfloat16, device_map=dm, offload_folder=offload_dir
            ).eval()
            extra = {"resident_layers": keep, "moe_layers": n, "offloaded_layers": n - keep}
    files = [str(p) for p in Path(offload_dir).rglob("*") if p.is_file()] if offload_dir else []
    if files:
        os.sync()  # written pages must be clean before the kernel will drop them
        _drop_pages(files)
        model.register_forward_pre_hook(lambda mod, args: _drop_pages(files))
        extra["offloaded_bytes"] = sum(os.path.getsize(f) for f in files)
    load_s = time.perf_counter() - t0
    counter = _ExpertUse(model) if spec["system"] == "transformers" else None
    from common import padded

    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else (eos or 0)

    def gen(batch, n):
        ids, mask = padded(batch, pad)
        steps = _Steps()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, do_sample=False,
                stopping_criteria=StoppingCriteriaList([steps]),
            )  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        rows = [_trim(r, model.generation_config.eos_token_id) for r in out[:, ids.shape[1] :].tolist()]
        return rows, t, t_end, steps.times

    gen(spec["warm"], spec["warm_tokens"])
    io0 = bytes_read()
    if counter:
        counter.active = True
    rows, t, t_end, times = gen(spec["prompts"], spec["new_tokens"])
    io1 = bytes_read()
    if counter:
        extra["expert_bytes_used"] = counter.bytes_used
    ntok = sum(len(r) for r in rows)
    res = {
        "token_ids": rows,
        "load_s": load_s,
        "generation_s": t_end - t,
        "ttft_s": times[0] - t,
        "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
        "tokens_per_s": ntok / (t_end - t),
        "bytes_read": None if io0 is None else io1 - io0,
        "hit_rate": None,
        **extra,
    }
    if offload_dir:
        shutil.rmtree(offload_dir, ignore_errors=True)
    return res
