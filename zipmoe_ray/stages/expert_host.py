"""ExpertHost: computes an expert on the node where its weights are (multi-device clusters).

Hidden states are small (a few KB per token) and experts are tens of MB, so for an expert held on another
device the executor sends that expert's input rows and routing weights here and gets its weighted output
rows back, instead of fetching the expert. The arithmetic is the executor's, operation for operation
(matmul of the group, the model's gate activation, matmul, routing weight; for Switch: linear,
activation, linear, router probability), so on nodes with the same kernels the outputs are bit-identical
to computing the expert on the executor (tests/test_cluster.py checks tokens against plain transformers).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import torch

from ..models.experts_impl import chunk_gate, gated_rows, switch_rows
from ..models.registry import get_arch
from ..store import open_store
from .weights import WeightBuilder

__all__ = ["ExpertHost"]

log = logging.getLogger(__name__)


class ExpertHost:
    """Plain class; in a cluster one runs as an actor on every node but the executor's."""

    def __init__(
        self, store_path: str, node: str = "", device: str | None = None, torch_threads: int | None = None
    ):
        from transformers.activations import ACT2FN

        # the executor's thread count: CPU GEMM results may depend on it (see DESIGN, bit-exactness)
        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.node = node
        self.store = open_store(store_path)
        from .executor import default_device

        self.device = torch.device(device or default_device())
        self.builder = WeightBuilder(self.store, self.device)
        config = self.store.config()
        self.gated = get_arch(self.store.model_type).family == "causal"
        act = config.get("hidden_act") if self.gated else config.get("dense_act_fn", "relu")
        self.act = ACT2FN[act]
        self.gate = chunk_gate(self.act)  # the default gate: _computable_elsewhere refuses any other
        self._tasks = 0
        self._busy = 0.0
        self._lock = threading.Lock()

    def compute(
        self, layer: int, expert: int, kind: str, x: torch.Tensor, w: torch.Tensor, value
    ) -> torch.Tensor:
        """Weighted output rows of ``expert`` for input rows ``x`` [n, hidden] and routing weights ``w`` [n].

        ``value``: the expert's decoded weights, one array (remote nodes decode in one piece:
        ``remote_node_config`` sets ``decode_parts=1``), resolved by Ray on this node without a copy."""
        t0 = time.monotonic()
        weights = self.builder.weights(layer, kind, np.asarray(value))
        x, w = x.to(self.device), w.to(self.device)
        if self.gated:
            out = gated_rows(x, weights, w, self.gate)
        else:
            out = switch_rows(x, weights, w, self.act)
        out = out.cpu()
        with self._lock:
            self._tasks += 1
            self._busy += time.monotonic() - t0
        return out

    def stats(self) -> dict:
        with self._lock:
            return {
                "node": self.node,
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
                "computes": self._tasks,
                "busy_s": self._busy,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._tasks, self._busy = 0, 0.0

    def ping(self) -> bool:
        return True
