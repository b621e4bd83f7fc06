"""Shared helpers for runtime tests: references from plain transformers, and one Ray cluster per module."""

from __future__ import annotations

import torch

BATCH1 = [[3, 14, 15, 92, 65, 35, 89, 79]]
BATCH4 = [[3, 14, 15, 92, 65, 35, 89, 79], [7, 7, 2], [100, 200, 300, 400, 500], [42]]


def padded(batch: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x in batch)
    ids, mask = [], []
    for x in batch:
        p = [pad] * (n - len(x))
        ids.append(p + x if left else x + p)
        mask.append([0] * len(p) + [1] * len(x) if left else [1] * len(x) + [0] * len(p))
    return torch.tensor(ids), torch.tensor(mask)


def reference(model_dir, arch: str, batch: list[list[int]], max_new: int, **kw):
    """Plain transformers on the original checkpoint: (generated ids per prompt, per-step logits)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from zipmoe_ray.models.hf import quiet_transformers

    seq2seq = arch == "switch_transformers"
    with quiet_transformers():
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        m = auto.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids, mask = padded(batch, m.generation_config.pad_token_id, left=not seq2seq)
    seed = kw.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = m.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )
    start = 1 if seq2seq else ids.shape[1]
    eos = m.generation_config.eos_token_id
    gen = []
    for row in out.sequences[:, start:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        gen.append(row[:cut])
    return gen, [x.float() for x in out.logits]


def assert_bit_exact(outs, ref_ids, ref_logits) -> None:
    """Every row's token ids and every step's logits equal the reference's (from :func:`reference`)."""
    assert [o.token_ids for o in outs] == ref_ids
    for i, o in enumerate(outs):
        assert o.logits.shape[0] >= len(ref_logits)  # every reference step is there
        for s in range(len(ref_logits)):
            assert torch.equal(o.logits[s], ref_logits[s][i]), f"prompt {i}, step {s}: logits differ"


def start_ray(num_cpus: int = 2, **system_config):
    """One Ray cluster on loopback for a test module (the caller shuts it down)."""
    import ray

    for attempt in range(3):  # on a busy machine the GCS can miss ray.init's start-up wait: try again
        if ray.is_initialized():
            break
        try:
            ray.init(
                address="local",  # this test's own cluster, never another one running on the machine
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                _system_config=system_config or None,
            )
        except RuntimeError as e:
            if "GCS" not in str(e) or attempt == 2:
                raise
            ray.shutdown()  # stops what this attempt started
    return ray
