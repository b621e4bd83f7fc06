"""The budget (runtime/budget.py, sizes.py) and its split between forms (cache/split.py)."""

from __future__ import annotations

import pytest

from zipmoe_ray.cache import Form, SplitRule
from zipmoe_ray.errors import BudgetError, ConfigError
from zipmoe_ray.runtime.sizes import parse_size


def test_split_rule():
    assert SplitRule().capacities(1000) == {Form.FULL: 200, Form.COMPRESSED: 300, Form.SM: 500}
    assert SplitRule().capacities(1000, full_bytes=900)[Form.FULL] == 1000  # everything fits in full form
    assert SplitRule.for_policy("full-only").capacities(10)[Form.SM] == 0
    with pytest.raises(ConfigError):
        SplitRule(0.6, 0.6, 0.0)
    with pytest.raises(ConfigError):
        SplitRule.for_policy("magic")


@pytest.mark.parametrize(
    "text, total, want",
    [
        ("123", None, 123),
        ("1.5GiB", None, 3 * 2**29),
        ("800MB", None, 800_000_000),
        ("25%", 1000, 250),
        ("2kib", None, 2048),
    ],
)
def test_parse_size(text, total, want):
    assert parse_size(text, total=total) == want


@pytest.mark.parametrize("text", ["lots", "25%%", "-1", "1.5 parsecs", "0%"])
def test_parse_size_rejects(text):
    with pytest.raises(BudgetError, match="budget"):
        parse_size(text, total=1000)


# -- the budget's one home -------------------------------------------------------------------------------
def _layout(tiny_stores):
    from zipmoe_ray.cache.layout import ModelLayout
    from zipmoe_ray.store import open_store

    return ModelLayout.of_store(open_store(tiny_stores["qwen2_moe"]))


def test_budget_parses_a_share_of_the_expert_bytes(tiny_stores):
    from zipmoe_ray.runtime.budget import Budget

    layout = _layout(tiny_stores)
    b = Budget.parse("25%", layout)
    assert b.bytes == layout.expert_bytes // 4 and b.expert_bytes == layout.expert_bytes
    assert Budget.parse(12345, layout).bytes == 12345 and Budget.parse("1KiB", layout).bytes == 1024


def test_budget_below_the_minimum_is_refused_with_the_flag_and_the_figure(tiny_stores):
    from zipmoe_ray.runtime.budget import Budget, minimum_budget

    layout = _layout(tiny_stores)
    need = minimum_budget(layout.sizes, layout.top_k)
    assert Budget.parse(need, layout).minimum(layout) == need
    Budget.parse(need, layout).require(layout)
    with pytest.raises(BudgetError, match=f"too small.*--memory-budget {need}$"):
        Budget.parse(need - 1, layout).require(layout)


def test_across_nodes_each_node_needs_its_share_of_a_layer(tiny_stores):
    from zipmoe_ray.runtime.budget import Budget, inflight_per_node, minimum_budget

    layout = _layout(tiny_stores)
    assert [inflight_per_node(6, n) for n in (1, 2, 4, 8)] == [6, 3, 2, 1]
    per_node = minimum_budget(layout.sizes, inflight_per_node(layout.top_k, 3))
    b = Budget.parse(3 * per_node - 1, layout)
    assert b.minimum(layout, 3) == 3 * per_node and b.per_node(3) < per_node
    with pytest.raises(BudgetError, match=f"split over 3 nodes.*--memory-budget {3 * per_node}"):
        b.require(layout, 3)
