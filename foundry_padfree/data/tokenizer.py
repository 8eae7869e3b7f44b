"""A small byte-level BPE tokenizer trained on the fly, for offline tests and demos.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` library on whatever text the
caller passes (`stdlib_texts()` gives a few hundred lines of Python standard-library docstrings)
and wrapped in `transformers.PreTrainedTokenizerFast`, so LLM-Foundry's dataset builders accept it
like any hub tokenizer.

Special tokens have fixed ids, the same as `tests/conftest.py`'s tiny Llama config:
`<pad>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2, `<unk>` = 3. Byte-level BPE never needs `<unk>`;
it is there because some callers expect one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
_BYTE_ALPHABET = 256

# Standard-library modules whose docstrings make the default training text: plain English with
# code fragments, present in every Python install, identical for a given Python version.
_STDLIB_MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "pathlib", "re", "string",
    "textwrap", "os", "shutil", "subprocess", "typing", "dataclasses", "heapq", "bisect",
    "random", "statistics", "datetime", "logging", "io", "csv", "math", "enum", "contextlib",
)  # fmt: skip


def stdlib_texts(max_lines: int = 600) -> list[str]:
    """Up to `max_lines` non-empty lines of Python standard-library docstrings, in a fixed order.

    Args:
        max_lines: how many lines to return at most (> 0).

    Raises:
        ValueError: if `max_lines` is not positive.
    """
    if max_lines <= 0:
        raise ValueError(f"max_lines = {max_lines}; ask for at least one line.")
    lines: list[str] = []
    for module_name in _STDLIB_MODULES:
        module = importlib.import_module(module_name)
        objects = [module] + [getattr(module, n) for n in sorted(vars(module)) if not n.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
            if not doc:
                continue
            lines.extend(line.strip() for line in doc.splitlines() if line.strip())
            if len(lines) >= max_lines:
                return lines[:max_lines]
    return lines


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    save_dir: str | Path | None = None,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for `transformers`.

    Training is deterministic: the same texts and vocab size give the same vocabulary.

    Args:
        texts: training text, e.g. `stdlib_texts()` or the strings of a dataset.
        vocab_size: target vocabulary size including the 4 special tokens and the 256 byte tokens
            (so at least 260); a small corpus may yield fewer merges than asked for.
        save_dir: if given, `save_pretrained` there too, so `AutoTokenizer.from_pretrained(save_dir)`
            and an LLM-Foundry `tokenizer: {name: <save_dir>}` load it.
        model_max_length: stored on the tokenizer (LLM-Foundry reads it).

    Returns:
        A `PreTrainedTokenizerFast` with pad/bos/eos/unk ids 0/1/2/3 and right padding.

    Raises:
        ValueError: if `vocab_size` cannot hold the byte alphabet and special tokens, or `texts`
            is empty.
    """
    min_vocab = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size = {vocab_size} is too small for a byte-level BPE: it needs the 256 byte tokens "
            f"and {len(SPECIAL_TOKENS)} special tokens; use vocab_size >= {min_vocab}."
        )
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts is empty (or all empty strings); pass some text to train the tokenizer on.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, f"{token} got id {tokenizer.token_to_id(token)}"

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )
    if save_dir is not None:
        wrapped.save_pretrained(str(save_dir))
    return wrapped
