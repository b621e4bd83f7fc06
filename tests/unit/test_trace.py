"""Routing traces (trace/): count traces drawn into steps that reproduce the counts, JSON round trips, no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zipmoe_ray.errors import ConfigError
from zipmoe_ray.trace import CountTrace, load_any, synth

SHAPE = dict(num_layers=3, num_experts=12, top_k=2, expert_bytes=1_000_000)


def test_count_trace_steps_reproduce_the_counts_exactly():
    t = synth(**SHAPE, prompts=2, tokens=30, skew=1.0, seed=3)
    drawn = [[0] * 12 for _ in range(3)]
    for step in t.steps(batch=1, seed=5):
        for layer, picks in enumerate(step):
            assert len(picks) <= 2 and len({e for e, _ in picks}) == len(picks)  # at most top-k, distinct
            for e, tok in picks:
                drawn[layer][e] += tok
    assert drawn == t.totals()


def test_batch_steps_activate_more_experts():
    t = synth(**SHAPE, prompts=8, tokens=20, skew=0.0)
    b1 = sum(len(p) for s in t.steps(batch=1) for p in s) / len(list(t.steps(batch=1)))
    b4 = sum(len(p) for s in t.steps(batch=4) for p in s) / len(list(t.steps(batch=4)))
    assert b4 > 2 * b1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_steps_are_the_same_whatever_the_chunk_and_keep_every_token(monkeypatch, batch):
    """Steps are made a chunk of prompt groups at a time; one group per chunk gives the same steps, in the
    same order, and every token of the trace is in them (the last group short when prompts % batch)."""
    import zipmoe_ray.trace.counts as counts

    counts_ = [[[0] * 12 for _ in range(3)], *synth(**SHAPE, prompts=7, tokens=9, skew=0.5, seed=1).counts]
    t = CountTrace(synth(**SHAPE, prompts=1, tokens=1).model, counts_)  # a prompt with no tokens first
    whole = list(t.steps(batch=batch, seed=4))
    monkeypatch.setattr(counts, "_CHUNK_CELLS", 1)
    assert list(t.steps(batch=batch, seed=4)) == whole
    drawn = [[0] * 12 for _ in range(3)]
    for step in whole:
        for layer, picks in enumerate(step):
            assert [e for e, _ in picks] == sorted({e for e, _ in picks})  # by expert, each once
            for e, tok in picks:
                drawn[layer][e] += tok
    assert drawn == t.totals()


def test_count_trace_json_round_trip_and_errors(tmp_path):
    t = synth(**SHAPE, prompts=1, tokens=5)
    t.save(tmp_path / "t.json")
    again = load_any(tmp_path / "t.json")
    assert isinstance(again, CountTrace) and again.counts == t.counts
    bad = t.to_json() | {"format": "something/9"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="format"):
        load_any(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="negative"):
        CountTrace(t.model, [[[-1] * 12] * 3])


def test_traces_load_without_torch(tmp_path):
    synth(**SHAPE, prompts=1, tokens=5).save(tmp_path / "t.json")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from zipmoe_ray.trace import load_any\n"
        f"print(load_any({str(tmp_path / 't.json')!r}).num_layers)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "3"


def test_a_recorded_step_routing_to_an_expert_the_model_lacks_is_refused(tmp_path):
    from zipmoe_ray.trace import load_recorded

    head = {"format": "zipmoe-trace/1", "model": {"layers": [0, 1], "num_experts": 4, "top_k": 2}}
    step = {"request": 0, "step": 0, "kind": "decode", "layers": {"1": [[1, 1], [4, 1]]}}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(head) + "\n" + json.dumps(step) + "\n")
    with pytest.raises(ConfigError, match="line 2 routes to expert 4, but the model has 4"):
        load_recorded(p)


def test_recorded_predictions_round_trip_into_the_workload(tmp_path):
    from zipmoe_ray.plan import Workload
    from zipmoe_ray.trace import load_recorded
    from zipmoe_ray.trace.recorded import RecordedTrace, TraceStep

    model = {"layers": [0, 1], "num_experts": 4, "top_k": 1, "expert_bytes": 1000}
    p = tmp_path / "t.jsonl"
    RecordedTrace(model).write_header(p)
    RecordedTrace.append(
        p,
        [
            TraceStep(0, 0, "prefill", 1, {0: [(1, 3)], 1: [(2, 3)]}, {1: [(2, 2), (3, 1)]}),
            TraceStep(0, 1, "decode", 1, {0: [(1, 1)], 1: [(3, 1)]}, {1: [(0, 1)]}),
            TraceStep(0, 2, "decode", 1, {0: [(0, 1)], 1: [(3, 1)]}),  # prefetch off: no predictions
        ],
    )
    tr = load_recorded(p)
    assert tr.steps[0].predicted == {1: [(2, 2), (3, 1)]} and tr.steps[2].predicted == {}
    w = Workload.from_recorded(tr)
    assert w.predictions == [[[], [(0, 1)]], [[], []]]  # decode steps, per layer position
    assert Workload.from_recorded(load_recorded(p), include_prefill=True).predictions[0] == [
        [],
        [(2, 2), (3, 1)],
    ]
    lines = p.read_text().splitlines()
    assert "predicted" not in json.loads(lines[-1])  # written only where there are some
    bad = json.loads(lines[2]) | {"predicted": {"1": [[9, 1]]}}
    p.write_text("\n".join([*lines[:2], json.dumps(bad)]) + "\n")
    with pytest.raises(ConfigError, match="line 3 routes to expert 9"):
        load_recorded(p)
