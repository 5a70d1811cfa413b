"""`Tokenizer`: the checkpoint's own tokenizer behind a small, stable interface.

Wraps a transformers fast tokenizer built offline from the checkpoint's files
(tokenizer.json / tokenizer_config.json) or from a GGUF file's vocabulary. Hashable by
identity, so it can sit in a `LanguageModel`'s static fields.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxsample.errors import ArgumentError, CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """Text ↔ token ids for one checkpoint.

    Attributes:
      hf: the underlying transformers tokenizer (for anything this wrapper does not cover).
      eos_token_ids: stop tokens known to the tokenizer (its eos token).
      bos_token_id, pad_token_id: special ids, or None.
      source: where it came from (a checkpoint directory or GGUF path), for messages.
    """

    def __init__(self, hf_tokenizer: Any, source: str = ""):
        """Wraps a transformers tokenizer (`source` names where it came from, for messages)."""
        self._hf = hf_tokenizer
        self._build: Callable[[], Any] | None = None
        self.source = source

    @classmethod
    def lazy(cls, build: Callable[[], Any], source: str = "") -> "Tokenizer":
        """A tokenizer whose transformers object `build()` makes on first use."""
        tokenizer = cls(None, source)
        tokenizer._build = build
        return tokenizer

    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer, for anything this wrapper does not cover
        (a lazy GGUF tokenizer builds it here, on first use)."""
        if self._hf is None:
            self._hf = self._build()
        return self._hf

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Loads tokenizer.json (+ tokenizer_config.json) from a checkpoint directory."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        try:
            return cls(AutoTokenizer.from_pretrained(directory, local_files_only=True), str(directory))
        except Exception as e:  # `tokenizers` reports a corrupt tokenizer.json as a bare Exception
            raise CheckpointError(f"{directory}: cannot load the tokenizer: {e}") from e

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a GGUF file's vocabulary, merges and chat template.

        Converting a GGUF vocabulary takes seconds, so it happens on first use, once per process.
        """
        path = Path(path).resolve()
        stat = path.stat()
        return cls.lazy(functools.partial(_gguf_tokenizer, path, stat.st_size, stat.st_mtime_ns), str(path))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r})"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's eos id as a 1-tuple, or `()` when it has none. The model's stop set
        (`LanguageModel.eos_token_ids`) comes from its config and generation config instead."""
        eos = self.hf.eos_token_id
        return () if eos is None else (int(eos),)

    @property
    def bos_token_id(self) -> int | None:
        """The tokenizer's beginning-of-sequence id, or None."""
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's pad id, or None; `js.load` uses it when the config sets none."""
        return self.hf.pad_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (special tokens added only if the tokenizer's config says so)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids (lists, numpy or JAX arrays)."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ArgumentError(f"decode takes a 1-D sequence of ids, got shape {ids.shape}")
        return self.hf.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a chat (`[{"role": ..., "content": ...}, ...]`) in the model's template."""
        if not self.hf.chat_template:
            raise ArgumentError(f"tokenizer {self.source!r} has no chat template")
        text = self.hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
        # The template already contains every special token it needs.
        return self.encode(text, add_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (transformers-readable)."""
        self.hf.save_pretrained(directory)


@functools.lru_cache(maxsize=8)
def _gguf_tokenizer(path: Path, size: int, mtime_ns: int) -> Any:
    """Converts a GGUF vocabulary once per process (keyed by the file's size and mtime)."""
    del size, mtime_ns  # cache key only
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot build the tokenizer from GGUF metadata: {e}") from e
