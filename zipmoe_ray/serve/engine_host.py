"""EngineHost: the server's engine, its batcher and its tokenizer. The engine starts in a background thread
(Ray actors, model load, calibration: seconds to minutes), so that the server answers meanwhile: /health says
``starting``, bad requests get their 400s, and good ones wait for the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

from ..errors import ConfigError
from .batcher import Batcher
from .config import ServeConfig
from .errors import ApiError
from .metrics import ServeMetrics

__all__ = ["EngineHost"]

log = logging.getLogger(__name__)


class EngineHost:
    """Owns what it starts. Returns at once; the tokenizer and the engine load in a background thread, and
    a failure there is reported by ``state``/``error`` and to every request waiting for them (503)."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics, engine=None):
        self.config = config
        self.metrics = metrics
        try:
            model = json.loads((Path(config.store_dir) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{config.store_dir}: no readable config.json ({e})") from None
        self.context: int | None = model.get("max_position_embeddings")
        self.vocab: int | None = model.get("vocab_size")
        self.tokenizer = None
        self.tok_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self.engine = engine
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self._own = engine is None
        self._ready = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._start, name="zipmoe-engine-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.config.store_dir)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"{self.config.store_dir}: no usable tokenizer ({e}); a server needs one"
                ) from None
            if self.engine is None:
                from .. import ZipMoEEngine  # the public API, as any application serving a store uses it

                c = self.config
                self.engine = ZipMoEEngine(c.store_dir, trace_path=c.trace_out, plan=c.plan, **c.engine)
            if self._closing:
                return
            self.batcher = Batcher(
                self.engine,
                self.config.max_batch,
                self.config.max_queue,
                self.metrics,
                self.decode,
                wait_s=self.config.batch_wait,
            )
            log.info("engine ready: %s", self.config.name)
        except Exception as e:  # reported by /health and to every request
            log.exception("the engine failed to start")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self._ready.set()

    @property
    def state(self) -> str:
        """``starting``, ``ready`` or ``failed``."""
        if not self._ready.is_set():
            return "starting"
        return "ready" if self.batcher is not None and self.batcher.alive() else "failed"

    async def ready(self, timeout: float | None = None) -> Batcher:
        """Wait (without blocking the event loop) for the engine; raises ApiError 503 if it failed."""
        if not self._ready.is_set():
            await asyncio.to_thread(self._ready.wait, timeout)
        if self.batcher is None:
            why = self.error or "it is still starting"
            raise ApiError(503, f"the engine is not available: {why}", type_="server_error")
        return self.batcher

    def encode(self, text: str) -> list[int]:
        with self.tok_lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        """Stop the batcher (its running generation is cancelled) and the engine if this host started it;
        waits for an engine still starting."""
        self._closing = True
        self._thread.join(300)
        if self.batcher is not None:
            self.batcher.close()
        if self._own and self.engine is not None:
            self.engine.close()
