"""What a generation asks for, checked before anything runs (runtime/text.py, request.py, budget.py,
config.py): token ids, prompt length against the context, sampling values, budgets above the machine's
memory, addresses; and streamed text that joins to exactly the decoded text."""

from __future__ import annotations

import random

import pytest

from zipmoe_ray.errors import BudgetError, ConfigError
from zipmoe_ray.runtime.budget import Budget, machine_memory
from zipmoe_ray.runtime.config import EngineConfig, parse_address
from zipmoe_ray.runtime.request import check_sampling
from zipmoe_ray.runtime.text import PromptText, TextStream

TEXTS = ["héllo wörld ✓ 日本語 🙂 end", "ÄÖÜ äöü ß — “quotes” … ∑∫√", "a  b\t\tc\n\nd ,. !", "🙂🙃🙂🙃"]


@pytest.fixture(scope="module")
def text(tiny_models) -> PromptText:
    return PromptText(str(tiny_models["qwen2_moe"]), vocab_size=512, context=256)


@pytest.mark.parametrize("s", TEXTS)
def test_streamed_pieces_join_to_the_decoded_text(text, s):
    ids = text.tokenizer(s)["input_ids"]
    stream = TextStream(text)
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == text.decode(ids) == s
    assert not any("\ufffd" in p for p in pieces)  # no half character is ever given out


def test_streamed_pieces_join_for_random_ids(text):
    """Any id sequence, valid UTF-8 or not (a random model's output): the join equals the decode."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
        stream = TextStream(text)
        joined = "".join(stream.push(t) for t in ids) + stream.finish()
        assert joined == text.decode(ids)


@pytest.mark.parametrize("ids, message", [([1, 2, 512], "token id 512 is outside"), ([-1], "token id -1")])
def test_token_ids_outside_the_vocabulary_are_refused(text, ids, message):
    with pytest.raises(ConfigError, match=message):
        text.encode(ids)


def test_prompt_plus_new_tokens_beyond_the_context_is_refused_with_both_numbers(text):
    ids, _ = text.encode([5] * 250)
    text.check_length(ids, 6)
    with pytest.raises(ConfigError, match=r"250 tokens plus 7 new tokens.*context of 256"):
        text.check_length(ids, 7)


@pytest.mark.parametrize("prompt", ["", [], [[]], 3, [1.5]])
def test_empty_or_malformed_prompts_are_refused(text, prompt):
    with pytest.raises(ConfigError):
        text.encode(prompt)


def test_a_damaged_tokenizer_is_a_config_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ConfigError, match="no usable tokenizer"):
        PromptText(str(tmp_path)).encode("hi")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"max_new_tokens": True}, "--max-new-tokens"),
        ({"temperature": -1.0}, "--temperature must be greater than 0"),
        ({"temperature": float("nan")}, "--temperature must be a finite"),
        ({"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
        ({"top_k": -3}, "--top-k"),
        ({"seed": 2**64}, "--seed"),
        ({"seed": "7"}, "--seed"),
    ],
)
def test_bad_sampling_values_are_refused(kw, message):
    args = {"max_new_tokens": 4, **kw}
    with pytest.raises(ConfigError, match=message):
        check_sampling(args.pop("max_new_tokens"), **args)


def test_good_sampling_values_pass():
    check_sampling(1, do_sample=True, seed=-5, temperature=0.7, top_p=1.0, top_k=0)


def test_a_budget_above_the_machine_memory_is_refused_with_the_figure():
    b = Budget(bytes=10 * 2**40, expert_bytes=2**30)
    with pytest.raises(
        BudgetError, match=r"this machine's memory \(24,000,000,000 B.*--allow-budget-above-memory"
    ):
        b.require_memory(memory=24_000_000_000)
    b.require_memory(memory=24_000_000_000, allow=True)
    Budget(bytes=2**30, expert_bytes=2**30).require_memory(memory=24_000_000_000)
    assert machine_memory() is None or machine_memory() > 2**26


@pytest.mark.parametrize(
    "address", ["notahost", "host:", ":6379", "host:0", "host:99999", "a b:1", "host:port"]
)
def test_malformed_addresses_are_refused(address):
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        EngineConfig(memory_budget="50%", address=address)


def test_addresses_and_timeouts():
    assert parse_address("10.0.0.2:6379") == ("10.0.0.2", 6379)
    assert parse_address("[::1]:6379") == ("::1", 6379)
    assert parse_address("ray://head:10001") == ("head", 10001)
    assert EngineConfig(memory_budget="50%").connect_timeout == 30.0
    for bad in (0, -1, float("inf"), "30"):
        with pytest.raises(ConfigError, match="connect_timeout"):
            EngineConfig(memory_budget="50%", connect_timeout=bad)
