"""An offline tokenizer for the tiny test models: byte-level BPE trained on a small packaged corpus.

Byte-level BPE can encode any text (every byte is a token), so prompts never fail to tokenize, and training
on ~2 KB of text takes milliseconds. Nothing is downloaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "build_tokenizer"]

PAD_TOKEN = "<|pad|>"  # id 0
EOS_TOKEN = "<|endoftext|>"  # id 1
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(out_dir: str | Path, vocab_size: int):
    """Train a byte-level BPE of at most ``vocab_size`` tokens and save it (transformers format) to ``out_dir``.

    Returns the PreTrainedTokenizerFast. Ids: 0 = pad, 1 = end of text, 2..257 = bytes, then merges. The
    vocabulary may be smaller than the model's (the corpus runs out of merges); ids beyond it decode to "".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("zipmoe_ray.models").joinpath("corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 258),
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(out_dir))
    return fast
