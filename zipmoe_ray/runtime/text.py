"""Prompts in, text out: the store's tokenizer, batches of prompts as token ids (checked against the model's
vocabulary and context), generated ids as text, and streamed text that joins to exactly the generated text.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError, ZipMoEError

__all__ = ["PromptText", "TextStream"]

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class PromptText:
    """The tokenizer of the store at ``store_dir``, loaded on first use (a store may have none: then only
    token ids are accepted). ``vocab_size`` and ``context`` (the model's positions; None: unbounded) are
    what prompts are checked against."""

    def __init__(self, store_dir: str, vocab_size: int | None = None, context: int | None = None):
        self.store_dir = store_dir
        self.vocab_size = vocab_size
        self.context = context
        self._tokenizer = None
        self._generation_eos: set[int] | None = None

    @classmethod
    def for_store(cls, store_dir: str, config: dict, causal: bool) -> PromptText:
        """The prompt checks of the model whose ``config.json`` is ``config``; ``causal``: a decoder-only
        model, whose prompt and new tokens share ``max_position_embeddings`` positions."""
        vocab = config.get("vocab_size")
        ctx = config.get("max_position_embeddings") if causal else None
        return cls(
            store_dir,
            vocab if isinstance(vocab, int) and vocab > 0 else None,
            ctx if isinstance(ctx, int) and ctx > 0 else None,
        )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.store_dir)
            except ZipMoEError:
                raise
            except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
                raise ConfigError(
                    f"{self.store_dir}: no usable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    "pass token ids instead of text"
                ) from None
        return self._tokenizer

    def encode(self, prompts) -> tuple[list[list[int]], bool]:
        """Token ids per prompt, and whether ``prompts`` was one prompt (text, or a list of ids) rather
        than a batch of them. Raises ConfigError for an empty batch, an empty prompt, another type, or an
        id outside the vocabulary."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], int)
        )
        batch = [prompts] if single else list(prompts) if isinstance(prompts, (list, tuple)) else None
        if batch is None:
            raise ConfigError(
                f"prompts must be text, token ids or a list of them, got {type(prompts).__name__}"
            )
        if not batch:
            raise ConfigError("no prompts given")
        ids = []
        for p in batch:
            if isinstance(p, str):
                if not p:
                    raise ConfigError("a prompt is empty; give at least one character or token")
                ids.append(list(self.tokenizer(p)["input_ids"]))
            elif isinstance(p, (list, tuple)) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p
            ):
                ids.append(list(p))
            else:
                raise ConfigError(f"a prompt must be text or a list of token ids, got {type(p).__name__}")
            if not ids[-1]:
                raise ConfigError("a prompt tokenized to nothing; give at least one token")
            self.check_ids(ids[-1])
        return ids, single

    def check_ids(self, ids: list[int]) -> None:
        """Refuse token ids outside ``[0, vocab_size)``."""
        bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            limit = f"0..{self.vocab_size - 1}" if self.vocab_size is not None else "non-negative"
            raise ConfigError(
                f"token id {bad[0]} is outside the model's vocabulary ({limit}); the model has "
                f"{self.vocab_size} tokens"
            )

    def check_length(self, ids: list[list[int]], max_new_tokens: int) -> None:
        """Refuse a prompt whose tokens plus ``max_new_tokens`` exceed the model's context."""
        if self.context is None:
            return
        n = max(len(x) for x in ids)
        if n + max_new_tokens > self.context:
            raise ConfigError(
                f"a prompt of {n} tokens plus {max_new_tokens} new tokens needs {n + max_new_tokens} positions, "
                f"more than the model's context of {self.context} (max_position_embeddings); shorten the "
                "prompt or lower --max-new-tokens"
            )

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens; empty when the store has no tokenizer."""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except ConfigError:
            return ""

    def eos(self) -> set[int]:
        try:
            e = self.tokenizer.eos_token_id
        except ConfigError:
            return set()
        return {e} if e is not None else set()

    def stop_ids(self) -> set[int]:
        """Every id that ends a sequence: the tokenizer's end of text and the generation config's (what
        transformers stops a row on)."""
        if self._generation_eos is None:
            from transformers import GenerationConfig

            try:
                e = GenerationConfig.from_pretrained(self.store_dir).eos_token_id
            except OSError:  # no generation_config.json: the tokenizer's is the one
                e = None
            self._generation_eos = set(e if isinstance(e, list) else [e]) - {None}
        try:
            return self.eos() | self._generation_eos
        except ConfigError:  # a store without a tokenizer
            return set(self._generation_eos)


class TextStream:
    """Text of a growing list of token ids, piece by piece, such that the pieces joined are exactly
    ``decode(all ids)`` (what ``generate`` returns) for any tokenizer.

    A piece is held back while the text so far ends in an incomplete UTF-8 sequence (a character whose
    bytes are split across tokens decodes to U+FFFD until its last byte arrives) or in whitespace (which
    clean-up of tokenization spaces may still remove), or while the decoded text is not an extension of
    what was already given out, as transformers' TextStreamer holds back incomplete words. :meth:`finish`
    gives out the rest. Not thread-safe.
    """

    def __init__(self, text: PromptText):
        self.text = text
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text that is now certain (often empty)."""
        self.ids.append(token_id)
        full = self.text.decode(self.ids)
        stable = full.rstrip()
        while stable.endswith(REPLACEMENT):
            stable = stable[:-1]
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return ""
        piece = stable[len(self.emitted) :]
        self.emitted = stable
        return piece

    def finish(self) -> str:
        """The rest of the text, once no more ids will come."""
        full = self.text.decode(self.ids)
        if not full.startswith(self.emitted):  # only a tokenizer that rewrites earlier text gets here
            log.warning("streamed text %r is not a prefix of the decoded text %r", self.emitted, full)
            return ""
        piece = full[len(self.emitted) :]
        self.emitted = full
        return piece
