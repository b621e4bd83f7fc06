"""On a CUDA device (skipped without one): the executor on the GPU, planes recombined there, is bit-exact
against plain transformers on the same GPU."""

from __future__ import annotations

import pytest
import torch

from zipmoe_ray.engine import ZipMoEEngine

from ..runtime_helpers import BATCH4, padded

pytestmark = pytest.mark.gpu


def _cuda_reference(model_dir, batch, max_new):
    from transformers import AutoModelForCausalLM

    from zipmoe_ray.models.hf import quiet_transformers

    with quiet_transformers():
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to("cuda")
    ids, mask = padded(batch, m.generation_config.pad_token_id, left=True)
    with torch.no_grad():
        out = m.generate(
            ids.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=max_new,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences[:, ids.shape[1] :].tolist(), [x.float().cpu() for x in out.logits]


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("budget", ["100%", "12%"])
def test_cuda_executor_matches_transformers_on_the_gpu(arch, budget, tiny_models, tiny_stores):
    ref_ids, ref_logits = _cuda_reference(tiny_models[arch], BATCH4, 8)
    with ZipMoEEngine(tiny_stores[arch], memory_budget=budget, backend="local", device="cuda") as engine:
        assert engine.device.startswith("cuda")
        outs = engine.generate(BATCH4, 8, output_logits=True)
    eos = engine.text.eos()
    for i, o in enumerate(outs):
        want = ref_ids[i][: next((j + 1 for j, t in enumerate(ref_ids[i]) if t in eos), len(ref_ids[i]))]
        assert o.token_ids == want
        for s in range(len(want)):
            assert torch.equal(o.logits[s], ref_logits[s][i])
