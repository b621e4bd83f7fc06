"""Prompts in, text out: the store's tokenizer, batches of prompts as token ids, generated ids as text."""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["PromptText"]


class PromptText:
    """The tokenizer of the store at ``store_dir``, loaded on first use (a store may have none: then only
    token ids are accepted)."""

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        self._tokenizer = None
        self._generation_eos: set[int] | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.store_dir)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"{self.store_dir}: no usable tokenizer ({e}); pass token ids instead of text"
                ) from None
        return self._tokenizer

    def encode(self, prompts) -> tuple[list[list[int]], bool]:
        """Token ids per prompt, and whether ``prompts`` was one prompt (text, or a list of ids) rather
        than a batch of them. Raises ConfigError for an empty batch, an empty prompt or another type."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ConfigError("no prompts given")
        ids = []
        for p in batch:
            if isinstance(p, str):
                ids.append(self.tokenizer(p)["input_ids"])
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                ids.append(list(p))
            else:
                raise ConfigError(f"a prompt must be text or a list of token ids, got {type(p).__name__}")
            if not ids[-1]:
                raise ConfigError("a prompt tokenized to nothing; give at least one token")
        return ids, single

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens; empty when the store has no tokenizer."""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except ConfigError:
            return ""

    def eos(self) -> set[int]:
        e = self.tokenizer.eos_token_id
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
