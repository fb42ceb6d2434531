"""The recipe's ``chat_template``: named templates, literal Jinja, ``auto``, bad names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merge_kernels.chat_templates import NAMED
from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import run_merge
from tests.merge_kernels.tokenizer_models import save_model

WORDS = ["<unk>", "a", "b", "c"]
LITERAL = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
OTHER = "{% for m in messages %}{{ m['role'] }}{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template-models")
    save_model(root / "m1", WORDS, ["<s>"], seed=0, chat_template=OTHER)
    save_model(root / "m2", WORDS, ["<s>"], seed=1, chat_template=LITERAL + "\n")
    save_model(root / "m3", WORDS, ["<s>"], seed=2, chat_template=LITERAL)
    return root


def _merge(models: Path, out: Path, **extra: object) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models / name)} for name in ("m1", "m2", "m3")],
        **extra,
    }
    run_merge(parse_recipe(recipe), out)
    return out


def _template(out: Path) -> str:
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").read_text() == config["chat_template"]
    return str(config["chat_template"])


def test_named_literal_and_auto_templates(models: Path, tmp_path: Path) -> None:
    assert _template(_merge(models, tmp_path / "named", chat_template="chatml")) == NAMED["chatml"]
    assert _template(_merge(models, tmp_path / "literal", chat_template=OTHER)) == OTHER
    # auto: the template most inputs share, whitespace around it ignored
    assert _template(_merge(models, tmp_path / "auto", chat_template="auto")) == LITERAL
    # with a built vocabulary the template goes into the written tokenizer too
    built = _merge(models, tmp_path / "built", chat_template="llama3", tokenizer_source="union")
    assert _template(built) == NAMED["llama3"]


def test_named_templates_render_a_conversation() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for name, template in NAMED.items():
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=True,
            bos_token="<s>",
            eos_token="</s>",
        )
        assert "hi" in rendered[0] and "yo" in rendered[0], name


def test_unknown_template_name_is_refused_with_a_suggestion() -> None:
    recipe = {"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}]}
    with pytest.raises(RecipeError, match="did you mean 'chatml'") as error:
        parse_recipe({**recipe, "chat_template": "chatmll"})
    assert error.value.field == "chat_template"
