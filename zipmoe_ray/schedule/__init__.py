"""Scheduling a layer's expert fetches over the I/O lane and the decode lanes (plain classes, no Ray)."""

from .costs import CostModel, measure_decode, measure_read
from .layer_schedule import (
    LayerPlan,
    Outline,
    Piece,
    Task,
    makespan_of,
    outline_layer,
    pieces_for,
    plan_layer,
)

__all__ = [
    "CostModel",
    "LayerPlan",
    "Outline",
    "Piece",
    "Task",
    "makespan_of",
    "measure_decode",
    "measure_read",
    "outline_layer",
    "pieces_for",
    "plan_layer",
]
