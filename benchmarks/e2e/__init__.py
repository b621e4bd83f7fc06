"""The systems and the harness of ``bench_e2e.py``, one module each.

hf.py        transformers in memory (the floor) and Accelerate's disk offload
engines.py   our engine's systems (full-lru, full-lru-local, zipmoe-local, zipmoe-ray), the all-hit runs
llamacpp.py  llama.cpp through xllamacpp's in-process server API, on a BF16 GGUF (convert.py)
runner.py    the parent side: one child process per system in its own cgroup, peak memory
report.py    tables, the issue's figures, the plot
"""
