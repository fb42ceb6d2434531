"""The recipe's tokenizer language, as mergekit 0.1.5 writes it (``mergekit/tokenizer/config.py``).

``tokenizer_source: base | union | <model>`` or a ``tokenizer:`` block (never both) makes
the merge build an output vocabulary and align every input's embedding and LM head rows to
it; ``tokens:`` overrides where a token's row comes from. ``chat_template:`` names a template
(or gives one) for the output tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from merge_kernels.checkpoints.reference import HubRef, LocalRef, LoraRef
from merge_kernels.errors import RecipeError
from merge_kernels.suggestions import did_you_mean

if TYPE_CHECKING:
    from merge_kernels.recipe import Recipe

_STRICT = ConfigDict(frozen=True, extra="forbid")
SourceModel = str | LocalRef | HubRef | LoraRef

#: Named chat templates (their texts are in :mod:`merge_kernels.chat_templates`), and
#: ``auto``: the template most of the inputs share.
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral", "auto")


class ModelTokenEmbedding(BaseModel):
    """A token's row taken from one model's row for a token (by text or by id)."""

    model_config = _STRICT

    kind: Literal["model_token"]
    model: SourceModel
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(BaseModel):
    """A token's row set to zeros."""

    model_config = _STRICT

    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """Where one output token's row comes from.

    Attributes:
        source: a model (its own row for the token), a model's row for another token, or
            zeros; None keeps the default rules.
        force: use ``source`` for every input, even those that have the token.
    """

    model_config = _STRICT

    source: ZeroEmbedding | ModelTokenEmbedding | SourceModel | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block."""

    model_config = _STRICT

    source: Literal["union", "base"] | SourceModel = Field(
        "union", description="`union` of every input's vocabulary, `base`, or a model."
    )
    tokens: dict[str, TokenEmbedding] | None = Field(
        None, description="Per-token overrides of where its embedding row comes from."
    )
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="Pad the vocabulary (embedding rows) to a multiple of this."
    )


def effective_tokenizer(recipe: Recipe) -> TokenizerSettings | None:
    """The tokenizer block the merge follows: ``tokenizer``, or one made from
    ``tokenizer_source``; None when neither is set (the first input's files are copied)."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is None:
        return None
    return TokenizerSettings(source=recipe.tokenizer_source)


def _input_names(recipe: Recipe) -> set[str]:
    from merge_kernels.slices import all_slices  # it imports the recipe module

    names = {str(entry.model) for entry in recipe.models or []}
    names |= {str(source.model) for slice_ in all_slices(recipe) for source in slice_.sources}
    if recipe.base_model is not None:
        names.add(str(recipe.base_model))
    return names


def check_tokenizer_fields(recipe: Recipe) -> None:
    """Check ``tokenizer``, ``tokenizer_source`` and ``chat_template`` together.

    Raises:
        RecipeError: both tokenizer forms given, an override naming a model that is not an
            input, a forced override without a source, or an unknown template name.
    """
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise RecipeError(
            "tokenizer",
            "give either tokenizer_source or a tokenizer block (whose `source` replaces it), "
            "not both",
        )
    names = _input_names(recipe)
    for token, setting in ((recipe.tokenizer and recipe.tokenizer.tokens) or {}).items():
        field = f"tokenizer.tokens.{token}"
        if setting.force and setting.source is None:
            raise RecipeError(field, "force needs a source to take the token's row from")
        source = setting.source
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if model is not None and not isinstance(model, ZeroEmbedding) and str(model) not in names:
            raise RecipeError(
                f"{field}.source",
                f"{str(model)!r} is not an input of this merge; "
                f"{did_you_mean(str(model), names)}name base_model or one of the models",
            )
    _check_chat_template(recipe.chat_template)


def _check_chat_template(template: str | None) -> None:
    # mergekit's rule: a short text without "{" must be a template name.
    if template is None or template in CHAT_TEMPLATE_NAMES:
        return
    if len(template) < 20 or "{" not in template:
        raise RecipeError(
            "chat_template",
            f"unknown template {template!r}; {did_you_mean(template, CHAT_TEMPLATE_NAMES)}"
            f"name one of {', '.join(CHAT_TEMPLATE_NAMES)} or give a Jinja template",
        )
