"""Controlled routing skew for random-initialised benchmark checkpoints (an edit of the model, stated as such).

Why: a random-initialised MoE does not route like a trained one. Its hidden states share one large
common direction, so every router scores the same few experts highest for every token (measured on the
Qwen1.5-MoE preset: the top 5 of 60 experts take 52-73% of a layer's picks), a workload that a
benchmark would otherwise inherit by accident.

What: for each MoE layer, measure the mean router input c over the prompt set, remove the component of
each router row along c (routing then follows the token-specific part of the hidden state: close to
uniform), then add back ``bias_e * c / |c|^2`` with ``bias_e = -skew * sigma * ln(rank_e)`` for a random
ranking of the experts, so expert popularity follows a Zipf-like law of exponent ~``skew`` (``skew=0``:
uniform). Every system in a benchmark, the plain-transformers reference included, runs the same edited
checkpoint, so tokens are still compared bit for bit. The measured skew is reported next to the results.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROUTER_SUFFIXES = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.classifier.weight")


def _router_modules(model):
    out = {}
    for name, mod in model.named_modules():
        if (
            name.endswith((".mlp.gate", ".block_sparse_moe.gate")) and hasattr(mod, "weight")
        ) or name.endswith(".router.classifier"):
            out[name] = mod
    return out


def measure_routing(model, batches: list[torch.Tensor], top_k: int) -> dict[str, Counter]:
    """Expert picks per router over a prefill of ``batches`` (top-k of the router logits)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    hooks = []
    for name, mod in _router_modules(model).items():

        def hook(m, inp, out, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).to(m.weight.dtype)
            logits = torch.nn.functional.linear(x, m.weight)
            for e in logits.topk(top_k, dim=-1).indices.reshape(-1).tolist():
                counts[name][e] += 1

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids) if not model.config.is_encoder_decoder else model(
                input_ids=ids, decoder_input_ids=ids[:, :1]
            )
    for h in hooks:
        h.remove()
    return counts


def fit_zipf(counts: Counter, n: int) -> float:
    """Least-squares Zipf exponent of a popularity histogram (log count against log rank)."""
    vals = sorted(counts.values(), reverse=True) + [0] * (n - len(counts))
    pts = [(math.log(r + 1), math.log(v)) for r, v in enumerate(vals) if v > 0]
    if len(pts) < 2:
        return 0.0
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return -sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0


def summarise(counts: dict[str, Counter], n: int) -> dict:
    layers = {}
    for name, c in sorted(counts.items()):
        tot = sum(c.values())
        layers[name] = {
            "zipf_fit": fit_zipf(c, n),
            "top5_share": sum(v for _, v in c.most_common(5)) / tot if tot else 0.0,
            "distinct": len(c),
        }
    fits = [v["zipf_fit"] for v in layers.values()]
    shares = [v["top5_share"] for v in layers.values()]
    return {
        "mean_zipf_fit": sum(fits) / len(fits),
        "mean_top5_share": sum(shares) / len(shares),
        "layers": layers,
    }


def rebias(model_dir: Path, out_dir: Path, skew: float, batches, seed: int = 0) -> dict:
    """Write a copy of ``model_dir`` whose routers follow a Zipf(~skew) popularity; returns routing stats
    before and after (fitted exponent and top-5 share per layer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    n = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_local_experts
    top_k = getattr(cfg, "num_experts_per_tok", 1)
    before = summarise(measure_routing(model, batches, top_k), n)
    hooks = []
    sums: dict[str, list] = {}
    for name, mod in _router_modules(model).items():

        def hook(m, inp, out, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            s = sums.setdefault(name, [torch.zeros(x.shape[-1]), 0, []])
            s[0] += x.sum(0)
            s[1] += x.shape[0]
            s[2].append(x)

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids) if not cfg.is_encoder_decoder else model(
                input_ids=ids, decoder_input_ids=ids[:, :1]
            )
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    new_weights = {}
    for name, mod in _router_modules(model).items():
        total, count, xs = sums[name]
        c = total / count
        chat = c / c.norm()
        w = mod.weight.float()
        w_perp = w - (w @ chat)[:, None] * chat[None, :]
        x = torch.cat(xs)
        with torch.no_grad():
            base_logits = x @ w_perp.t()  # [tokens, experts]
        sigma = float(base_logits.std())
        ranks = torch.randperm(w.shape[0], generator=g).float() + 1
        shape = -sigma * torch.log(ranks)

        def fitted(alpha: float, base=base_logits, shape=shape, n=w.shape[0]) -> float:
            picks = (base + alpha * shape).topk(top_k, dim=-1).indices.reshape(-1).tolist()
            return fit_zipf(Counter(picks), n)

        lo, hi = 0.0, 4.0  # the bias scale whose measured Zipf exponent matches ``skew`` on these inputs
        if skew > 0:
            for _ in range(20):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if fitted(mid) < skew else (lo, mid)
        bias = ((lo + hi) / 2 if skew > 0 else 0.0) * shape
        new = w_perp + bias[:, None] * (chat / c.norm())[None, :]
        new_weights[name + ".weight"] = new.to(mod.weight.dtype)
        with torch.no_grad():
            mod.weight.copy_(new_weights[name + ".weight"])
    after = summarise(measure_routing(model, batches, top_k), n)
    # write the copy: every file as is, router tensors replaced (names as on disk)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dir, out_dir)
    disk_names = new_weights
    for f in sorted(out_dir.glob("*.safetensors")):
        sd = load_file(str(f))
        changed = False
        for k in list(sd):
            target = k.replace("block_sparse_moe.gate", "mlp.gate")
            if k.endswith(ROUTER_SUFFIXES) and target in disk_names:
                sd[k] = disk_names[target].contiguous()
                changed = True
        if changed:
            save_file(sd, str(f), metadata={"format": "pt"})
    (out_dir / "zipmoe-routing.json").write_text(
        json.dumps({"skew": skew, "seed": seed, "before": before, "after": after}, indent=2)
    )
    return {"before": before, "after": after}
