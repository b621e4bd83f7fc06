"""What the cache needs to know of a model: every expert's sizes per form, its top-k, whether it is raw."""

from __future__ import annotations

from dataclasses import dataclass

from .forms import ExpertSizes, Key

__all__ = ["ModelLayout", "expert_sizes"]


def expert_sizes(store) -> dict[Key, ExpertSizes]:
    """Every expert's byte sizes in each form, from a store's index (store.reader.Store)."""
    raw = store.codec == "none"
    return {
        (r.layer, r.expert): ExpertSizes(
            r.original_bytes,
            r.length,
            r.e_length,
            r.sm_length,
            raw,
            max(1, min(len(t.shards) for t in r.tensors)) if r.tensors else 1,
        )
        for r in store.index.experts
    }


@dataclass(frozen=True)
class ModelLayout:
    """Every expert's sizes, the model's top-k, and whether the store is raw (``--codec none``: the
    classic-offloading baseline, whose only form is FULL)."""

    sizes: dict[Key, ExpertSizes]
    top_k: int
    raw_codec: bool = False

    @classmethod
    def of_store(cls, store) -> ModelLayout:
        return cls(expert_sizes(store), store.top_k, store.codec == "none")

    @property
    def expert_bytes(self) -> int:
        """Bytes of every routed expert decoded (what a ``25%`` budget is a share of)."""
        return sum(s.full for s in self.sizes.values())
