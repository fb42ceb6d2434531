"""Every published mergekit config in the corpus: accepted by tureen and equal to mergekit.

Each config is mapped onto tiny local checkpoints (``tiny_models``), merged by mergekit
0.1.5 and by tureen (unchanged, and with ``reference: mergekit``), and compared by the rules
in ``harness``. Checkpoints are built once per session and shared between configs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.mergekit_corpus.harness import (
    CorpusResult,
    compare,
    config_paths,
    evaluate,
    load_documents,
)
from tests.mergekit_corpus.tiny_models import (
    BASE_VOCAB,
    map_config,
    uses_vocabulary_union,
)

pytest.importorskip("mergekit", reason="mergekit 0.1.5 is the oracle (the test extra)")

REGISTERED_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "nuslerp",
    "multislerp", "karcher", "model_stock", "passthrough", "della", "della_linear",
    "breadcrumbs", "breadcrumbs_ties", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
}  # fmt: skip


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    return tmp_path_factory.mktemp("mergekit-corpus")


def test_corpus_is_large_and_covers_every_mergekit_method() -> None:
    from mergekit.merge_methods.registry import registered_methods  # type: ignore[import-untyped]

    paths = config_paths()
    assert len(paths) >= 60
    methods = {str(doc["merge_method"]) for p in paths for doc in load_documents(p)}
    assert {m.spec.name for m in registered_methods()} == REGISTERED_METHODS
    assert methods >= REGISTERED_METHODS


@pytest.mark.parametrize("path", config_paths(), ids=lambda p: p.stem)
def test_config_is_published_text_that_mergekit_accepts(path: Path) -> None:
    from mergekit.config import MergeConfiguration  # type: ignore[import-untyped]

    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# Source: ")
    for document in load_documents(path):
        MergeConfiguration.model_validate(document)


# Configs tureen refuses: misspelled or unknown keys that mergekit silently ignores (so a typo
# would change a merge unnoticed). Each refusal must name the key.
REFUSED_KEYS = {
    "sce_extra_parameters_union": "smooth",  # no method has this parameter
    # its stray top-level `select_topk` is a warning; `dype` is a misspelled `dtype`
    "sce_stray_top_level_keys": "dype",
}
# Every accepted config must match mergekit. Entries tied in magnitude (TIES, Breadcrumbs) or
# variance (SCE) at a trim edge are not an exception: mergekit's sorts leave their order
# unspecified, and the harness runs mergekit with that order pinned to tureen's
# (``pinned_ties``), so such configs compare value for value.
# tokenizer_source: union, where mergekit gives the tokens new to the base ids in an order that
# changes from run to run (it walks hash maps), so the rows of the vocabulary tensors are
# compared by id against an unstable order: every other tensor must match.
UNSTABLE_VOCABULARY = {
    "linear_union_llama3", "slerp_solar_48_layers_union", "karcher_named_first_union",
}  # fmt: skip
_VOCABULARY_TENSORS = {"model.embed_tokens.weight", "lm_head.weight"}


_RESULTS: dict[Path, CorpusResult] = {}


def _result(path: Path, root: Path) -> CorpusResult:
    if path not in _RESULTS:
        _RESULTS[path] = evaluate(path, root)
    return _RESULTS[path]


def test_listed_configs_exist() -> None:
    names = {path.stem for path in config_paths()}
    assert set(REFUSED_KEYS) <= names
    assert names >= UNSTABLE_VOCABULARY


@pytest.mark.parametrize("path", config_paths(), ids=lambda p: p.stem)
def test_tureen_accepts_config_or_names_the_refused_key(path: Path, corpus_root: Path) -> None:
    result = _result(path, corpus_root)
    assert result.mergekit_error is None, result.summary()
    key = REFUSED_KEYS.get(path.stem)
    if key is None:
        assert result.accepted, result.summary()
    else:
        assert result.unchanged_error is not None and key in result.unchanged_error


@pytest.mark.parametrize(
    "path", [p for p in config_paths() if p.stem not in REFUSED_KEYS], ids=lambda p: p.stem
)
def test_tureen_output_matches_mergekit(path: Path, corpus_root: Path) -> None:
    result = _result(path, corpus_root)
    if path.stem in UNSTABLE_VOCABULARY:
        assert result.accepted and result.comparison is not None, result.summary()
        differing = {problem.split(":")[0] for problem in result.comparison.problems}
        assert differing <= _VOCABULARY_TENSORS, result.summary()
    else:
        assert result.ok, result.summary()


def test_mapping_rewrites_every_reference_to_a_local_folder(tmp_path: Path) -> None:
    text = """
merge_method: della_linear
base_model: org/base
modules:
  default:
    slices:
      - sources:
          - {model: org/a+org/lora, layer_range: [0, 6]}
          - {model: stage-one, layer_range: [0, 6]}
tokenizer: {source: union}
dtype: bfloat16
"""
    stage = {"name": "stage-one", "merge_method": "linear", "models": [{"model": "org/b"}]}
    mapped = map_config([stage, yaml.safe_load(text)], tmp_path, lambda name: f"/stages/{name}")
    document = mapped.documents[1]
    sources = document["modules"]["default"]["slices"][0]["sources"]
    base, adapter = sources[0]["model"].split("+")
    assert (Path(base) / "config.json").is_file()
    assert (Path(adapter) / "adapter_config.json").is_file()
    assert (Path(adapter) / "adapter_model.safetensors").is_file()
    assert sources[1]["model"] == "/stages/stage-one"
    assert (Path(document["base_model"]) / "model.safetensors").is_file()
    config = yaml.safe_load((Path(base) / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["torch_dtype"] == "bfloat16"
    assert uses_vocabulary_union(document)


def test_mapping_is_deterministic_and_vocabularies_differ_under_union(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    document = {
        "merge_method": "linear",
        "models": [{"model": f"org/m{i}"} for i in range(6)],
        "tokenizer_source": "union",
    }
    first = map_config([document], tmp_path / "one")
    second = map_config([document], tmp_path / "two")
    sizes = set()
    for reference, folder in first.folders.items():
        again = second.folders[reference]
        ours, theirs = (
            load_file(str(folder / "model.safetensors")),
            load_file(str(again / "model.safetensors")),
        )
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
        sizes.add(ours["model.embed_tokens.weight"].shape[0])
    assert min(sizes) >= BASE_VOCAB and len(sizes) > 1


def test_comparison_flags_a_changed_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    for side, value in (("ours", 1.0), ("theirs", 1.0 + 1e-3)):
        folder = tmp_path / side
        folder.mkdir()
        save_file({"w": torch.full((4, 4), value)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"num_hidden_layers": 1, "vocab_size": 4}')
    same = compare(tmp_path / "ours", tmp_path / "ours", ["linear"], None)
    assert not same.problems
    changed = compare(tmp_path / "ours", tmp_path / "theirs", ["linear"], None)
    assert changed.problems and "relative L2" in changed.problems[0]
