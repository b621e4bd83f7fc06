"""Scheduling a layer's expert fetches over the I/O lane and the decode lanes (plain classes, no Ray)."""

from .costs import CostModel, measure_decode, measure_read
from .layer_schedule import LayerPlan, Piece, Task, plan_layer, simulate

__all__ = [
    "CostModel",
    "LayerPlan",
    "Piece",
    "Task",
    "measure_decode",
    "measure_read",
    "plan_layer",
    "simulate",
]
