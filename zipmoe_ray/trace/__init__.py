"""Routing traces: recorded by the engine (zipmoe-trace/1) or aggregated counts (zipmoe-count-trace/1).

Pure Python: loadable without torch.
"""

from .counts import COUNT_FORMAT, CountTrace, load_any, synth
from .recorded import FORMAT, RecordedTrace, TraceStep, load_recorded

__all__ = [
    "COUNT_FORMAT",
    "FORMAT",
    "CountTrace",
    "RecordedTrace",
    "TraceStep",
    "load_any",
    "load_recorded",
    "synth",
]
