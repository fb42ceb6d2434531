"""Writing the output's tokenizer files and chat template.

A built vocabulary is written as transformers' ``save_pretrained`` writes a fast tokenizer
(``tokenizer.json``, and ``tokenizer_config.json`` whose ``added_tokens_decoder`` lists every
added token); otherwise the source's files are copied as they are. A recipe's
``chat_template`` (a name, ``auto`` or a Jinja text, resolved as mergekit 0.1.5's
``_set_chat_template`` does) goes into ``tokenizer_config.json`` and ``chat_template.jinja``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_kernels.chat_templates import NAMED
from merge_kernels.checkpoints.base import Checkpoint, load_json_object
from merge_kernels.io.staging import write_bytes_atomic, write_json_atomic
from merge_kernels.model_card import copy_tokenizer
from merge_kernels.plan import MergePlan
from merge_kernels.tokenizer_files import TOKENIZER_CONFIG, TOKENIZER_JSON
from merge_kernels.tokenizer_source import tokenizer_checkpoint
from merge_kernels.vocabulary import Vocabulary

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Files that describe the tokens beside tokenizer.json: kept from the source when the
# vocabulary is rebuilt (the slow-tokenizer files would no longer match it).
_KEPT_WITH_BUILT = ("special_tokens_map.json", "generation_config.json")


def write_tokenizer(plan: MergePlan, folder: Path, options: MergeOptions) -> None:
    """Write the output's tokenizer files (built or copied) and its chat template."""
    source, opened_here = tokenizer_checkpoint(plan.recipe, plan.inputs, options)
    try:
        built = plan.vocabulary.vocabulary if plan.vocabulary is not None else None
        if built is not None and built.rewritten:
            _write_built(built, folder)
            for name in _KEPT_WITH_BUILT:
                path = source.folder / name
                if source.confinement.is_file(path):
                    source.confinement.copy_file(path, folder / name)
        else:
            copy_tokenizer(source, folder)
    finally:
        if opened_here:
            source.close()
    template = chat_template_text(plan.recipe.chat_template, [i.checkpoint for i in plan.inputs])
    if template is not None:
        set_chat_template(folder, template)


def _write_built(vocabulary: Vocabulary, folder: Path) -> None:
    write_bytes_atomic(folder / TOKENIZER_JSON, vocabulary.tokenizer.to_str().encode())
    config = dict(vocabulary.config)
    decoder = vocabulary.tokenizer.get_added_tokens_decoder()
    config["added_tokens_decoder"] = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(decoder.items())
    }
    write_json_atomic(folder / TOKENIZER_CONFIG, config)


def _input_template(checkpoint: Checkpoint) -> str | None:
    """The chat template transformers would load for ``checkpoint`` (its
    ``chat_template.jinja`` first, else ``tokenizer_config.json``'s, the default one of a
    list)."""
    confinement = checkpoint.confinement
    jinja = checkpoint.folder / CHAT_TEMPLATE_FILE
    if confinement.is_file(jinja):
        return confinement.read_bytes(jinja).decode("utf-8", errors="replace")
    config = load_json_object(
        checkpoint.folder / TOKENIZER_CONFIG, missing_ok=True, confinement=confinement
    )
    template: Any = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def chat_template_text(name: str | None, inputs: Sequence[Checkpoint]) -> str | None:
    """The template text a recipe's ``chat_template`` stands for, or None for none.

    ``auto`` is the template most inputs share (compared without surrounding whitespace;
    the first input's among equally common ones); a name is tureen's text of that format;
    anything else is taken as a Jinja template itself.
    """
    if not name:
        return None
    if name == "auto":
        found = [t.strip() for t in (_input_template(c) for c in inputs) if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(name, name)


def set_chat_template(folder: Path, template: str) -> None:
    """Put ``template`` into the output's ``tokenizer_config.json`` and ``chat_template.jinja``."""
    path = folder / TOKENIZER_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["chat_template"] = template
    write_json_atomic(path, config)
    write_bytes_atomic(folder / CHAT_TEMPLATE_FILE, template.encode())
