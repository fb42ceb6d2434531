"""Reading a checkpoint's tokenizer as transformers' fast tokenizer loads it, without transformers.

mergekit 0.1.5 builds vocabularies from ``transformers.AutoTokenizer`` objects; transformers'
fast tokenizers are the ``tokenizers`` library's ``Tokenizer`` of ``tokenizer.json`` plus the
tokens ``tokenizer_config.json`` adds (its ``added_tokens_decoder`` and the named special
tokens). This module reproduces that from the two files alone, read through the checkpoint's
confinement (never unpickled), and mergekit's ``get_stripped_tokenizer`` (tokens at or past
the model's ``vocab_size`` removed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merge_kernels.checkpoints.base import Checkpoint, load_json_object
from merge_kernels.errors import CheckpointFileError, RecipeError

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_NAMED_SPECIAL = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass
class InputTokenizer:
    """One checkpoint's tokenizer, as transformers would load it.

    Attributes:
        tokenizer: the ``tokenizers`` backend (with the config's tokens added).
        config: the parsed ``tokenizer_config.json`` (empty when absent).
        vocab_size: the model's ``vocab_size`` (its embedding rows), or None if unknown.
    """

    tokenizer: Tokenizer
    config: dict[str, Any]
    vocab_size: int | None

    def vocab(self) -> dict[str, int]:
        """Every token, added ones included, with its id (``get_vocab()``)."""
        return dict(self.tokenizer.get_vocab(with_added_tokens=True))

    def size_limit(self) -> int:
        """Ids at or past this are not rows of the model (mergekit's ``get_vocab_size``)."""
        if self.vocab_size is not None:
            return self.vocab_size
        return int(self.tokenizer.get_vocab_size(with_added_tokens=False))


def tokenizers_library() -> Any:
    """The ``tokenizers`` module, or a RecipeError saying how to install it."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - a dependency of the main install
        raise RecipeError(
            "tokenizer_source",
            "building an output vocabulary needs the tokenizers package: pip install tokenizers",
        ) from None
    return tokenizers


def model_vocab_size(config: dict[str, object]) -> int | None:
    """``vocab_size`` from a model config (top level, else its ``text_config``)."""
    value = config.get("vocab_size")
    text = config.get("text_config")
    if value is None and isinstance(text, dict):
        value = text.get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def has_tokenizer(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint has a ``tokenizer.json`` (links out of the roots raise)."""
    return checkpoint.confinement.is_file(checkpoint.folder / TOKENIZER_JSON)


def read_tokenizer(checkpoint: Checkpoint) -> InputTokenizer:
    """Load ``checkpoint``'s tokenizer from its ``tokenizer.json`` and config.

    Raises:
        RecipeError: the checkpoint has no ``tokenizer.json``.
        CheckpointFileError: a file is not valid JSON or not a tokenizer.
        PathOutsideRootsError: a file links outside the allowed roots.
    """
    tokenizers = tokenizers_library()
    path = checkpoint.folder / TOKENIZER_JSON
    if not has_tokenizer(checkpoint):
        raise RecipeError(
            "tokenizer_source",
            f"{checkpoint.display_name} has no {TOKENIZER_JSON}; building the output "
            "vocabulary needs each tokenizer's fast-tokenizer file (save it with a fast "
            "tokenizer), or leave tokenizer_source unset to copy the first input's files",
        )
    text = checkpoint.confinement.read_bytes(path).decode("utf-8", errors="replace")
    try:
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # the library raises plain Exceptions for bad files
        raise CheckpointFileError(
            f"{checkpoint.display_name}/{TOKENIZER_JSON} is not a tokenizer ({error})",
            details={"file": TOKENIZER_JSON},
        ) from None
    config = load_json_object(
        checkpoint.folder / TOKENIZER_CONFIG, missing_ok=True, confinement=checkpoint.confinement
    )
    _add_config_tokens(tokenizer, config)
    return InputTokenizer(tokenizer, config, model_vocab_size(checkpoint.config))


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _added_token(value: object, *, special: bool) -> AddedToken | None:
    from tokenizers import AddedToken

    content = _token_text(value)
    if content is None:
        return None
    flags = value if isinstance(value, dict) else {}
    return AddedToken(
        content,
        single_word=bool(flags.get("single_word", False)),
        lstrip=bool(flags.get("lstrip", False)),
        rstrip=bool(flags.get("rstrip", False)),
        normalized=bool(flags.get("normalized", not special)),
        special=bool(flags.get("special", special)),
    )


def _special_values(config: dict[str, Any]) -> list[object]:
    values: list[object] = [config.get(key) for key in _NAMED_SPECIAL]
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, dict):
            extra = list(extra.values())
        if isinstance(extra, list):
            values.extend(extra)
    return values


def _add_config_tokens(tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    """Add what transformers adds on loading: the config's ``added_tokens_decoder`` entries
    the file lacks (by id), then the named and extra special tokens (marked special)."""
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder")
    entries = (
        sorted(decoder.items(), key=lambda item: int(item[0])) if isinstance(decoder, dict) else []
    )
    missing = []
    for _, value in entries:
        token = _added_token(value, special=True)
        if token is not None and token.content not in present:
            missing.append(token)
            present.add(token.content)
    specials = [
        token
        for token in (_added_token(value, special=True) for value in _special_values(config))
        if token is not None
    ]
    missing += [token for token in specials if token.content not in present]
    if missing:
        tokenizer.add_tokens(missing)
    if specials:
        tokenizer.add_special_tokens(specials)


def stripped(source: InputTokenizer, name: str) -> InputTokenizer:
    """mergekit's ``get_stripped_tokenizer``: the tokenizer without tokens whose id is at or
    past the model's ``vocab_size`` (only BPE tokenizers can be stripped).

    Raises:
        RecipeError: tokens must be stripped from a tokenizer that is not BPE.
    """
    tokenizers = tokenizers_library()
    limit = source.vocab_size
    vocab = source.vocab()
    if limit is None:
        return source
    unused = {token for token, index in vocab.items() if index >= limit}
    if not unused:
        return source
    data = json.loads(source.tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise RecipeError(
            "tokenizer_source",
            f"{name}'s tokenizer has tokens past its vocab_size {limit} and is of type "
            f"{model.get('type')}; only BPE tokenizers can have them removed",
        )
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < limit]
    for token in unused:
        model.get("vocab", {}).pop(token, None)

    def keep(merge: object) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return isinstance(parts, list) and not any(part in unused for part in parts)

    model["merges"] = [merge for merge in model.get("merges", []) if keep(merge)]
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return InputTokenizer(tokenizer, source.config, source.vocab_size)
