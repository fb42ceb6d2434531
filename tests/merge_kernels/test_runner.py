"""The streaming engine end to end on real safetensors checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.errors import (
    CheckpointFileError,
    CheckpointNotFoundError,
    IncompatibleCheckpointsError,
    MergeCancelledError,
    RecipeError,
)
from merge_kernels.methods.kernel import TensorContext
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, Progress, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from merge_kernels.tensor_parameters import resolve_parameters

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
    return root


RECIPES: dict[str, dict[str, Any]] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "ft1", "parameters": {"weight": 2}},
            {"model": "ft2"},
            {"model": "ft3"},
        ],
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "parameters": {"lambda": 0.8},
        "models": [{"model": f"ft{i}"} for i in (1, 2, 3)],
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"density": 0.3},
        "models": [{"model": f"ft{i}"} for i in (1, 2, 3)],
    },
    "dare_linear": {
        "merge_method": "dare_linear",
        "base_model": "base",
        "parameters": {"density": 0.4},
        "seed": 7,
        "models": [{"model": f"ft{i}"} for i in (1, 2, 3)],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "parameters": {"density": 0.4},
        "models": [{"model": f"ft{i}"} for i in (1, 2, 3)],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [0.2, 0.8]},
        "models": [{"model": "ft1"}],
    },
}


def reference_merge(root: Path, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Merge in memory, whole tensors at once, from the files loaded by safetensors itself."""
    recipe = parse_recipe(document)
    spec = recipe.method
    base = load_file(root / "base" / "model.safetensors") if spec.needs_base else None
    merged_models = recipe.merged_models()
    loaded = [
        load_file(root / str(entry.model) / "model.safetensors") for _, entry in merged_models
    ]
    out = {}
    for name in load_file(root / "base" / "model.safetensors"):
        t = 0.0 if "embed" in name else 1.0
        if ".layers." in name:
            t = int(name.split(".layers.")[1].split(".")[0]) / (SHAPE.num_hidden_layers - 1)
        params = resolve_parameters(recipe, name, t)
        out[name] = spec.merge_tensors(
            [m[name] for m in loaded],
            base=base[name] if base is not None else None,
            params=params.method.model_dump(by_alias=True),
            model_params=[p.model_dump(by_alias=True) for p in params.models],
            context=TensorContext(
                name=name, seed=recipe.seed, model_indices=tuple(i for i, _ in merged_models)
            ),
        )
    return out


def merge(root: Path, document: dict[str, Any], out: Path, **options: Any) -> Any:
    return run_merge(parse_recipe(document), out, MergeOptions(base_dir=root, **options))


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_output_equals_in_memory_reference_and_loads_in_transformers(
    models: Path, tmp_path: Path, method: str
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = merge(models, RECIPES[method], out)
    assert result.out_dir == out
    assert {"config.json", "model.safetensors", "README.md", "tureen_recipe.yaml"} <= set(
        result.files
    )
    written = load_file(out / "model.safetensors")
    expected = reference_merge(models, RECIPES[method])
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.up_proj.weight"],
        written["model.layers.1.mlp.up_proj.weight"],
    )
    assert not list(tmp_path.glob(".*tureen-partial"))


def test_model_card_front_matter_and_recipe(models: Path, tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "merged"
    merge(models, RECIPES["ties"], out)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers"
    assert "ties" in front["tags"]
    # Only Hub repository ids may be listed as base_model: these inputs are local folders
    # (the card of a merge of Hub inputs lists them, with base_model_relation: merge).
    assert "base_model" not in front
    assert "base_model_relation" not in front
    assert "| base | `base` | local |" in card
    assert "sha256 `" in card
    assert (
        parse_recipe(yaml.safe_load((out / "tureen_recipe.yaml").read_text())).merge_method
        == "ties"
    )


@pytest.mark.parametrize("method", ["linear", "dare_linear", "task_arithmetic"])
def test_row_chunks_and_shards_give_the_same_tensors(
    models: Path, tmp_path: Path, method: str
) -> None:
    whole = merge(models, RECIPES[method], tmp_path / "whole")
    pieces = merge(
        models, RECIPES[method], tmp_path / "pieces", chunk_elements=700, max_shard_bytes=60_000
    )
    index = json.loads((tmp_path / "pieces" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert whole.tensors == pieces.tensors
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    got: dict[str, torch.Tensor] = {}
    for shard in shards:
        got.update(load_file(tmp_path / "pieces" / shard))
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_out_dtype_casts_once_and_updates_config(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    merge(models, RECIPES["ties"] | {"out_dtype": "bfloat16"}, out)
    written = load_file(out / "model.safetensors")
    expected = reference_merge(models, RECIPES["ties"])
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    assert torch.equal(written["lm_head.weight"], expected["lm_head.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_progress_reaches_the_totals(models: Path, tmp_path: Path) -> None:
    seen: list[Progress] = []
    run_merge(
        parse_recipe(RECIPES["linear"]),
        tmp_path / "out2",
        MergeOptions(base_dir=models),
        progress=seen.append,
    )
    assert seen[-1].tensors_done == seen[-1].tensors_total == len(SHAPE.tensors())
    assert seen[-1].bytes_done == seen[-1].bytes_total
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)


def test_cancel_leaves_nothing(models: Path, tmp_path: Path) -> None:
    calls = iter(range(1000))
    with pytest.raises(MergeCancelledError):
        run_merge(
            parse_recipe(RECIPES["ties"]),
            tmp_path / "out",
            MergeOptions(base_dir=models),
            should_cancel=lambda: next(calls) > 3,
        )
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_merge_resumes_after_the_last_shard(models: Path, tmp_path: Path) -> None:
    document = RECIPES["dare_ties"]
    options = MergeOptions(base_dir=models, max_shard_bytes=25_000)
    reference = run_merge(parse_recipe(document), tmp_path / "reference", options)

    class CrashError(Exception):
        pass

    def crash_in_third_shard(progress: Progress) -> None:
        if progress.bytes_done > 70_000:
            raise CrashError

    with pytest.raises(CrashError):
        run_merge(parse_recipe(document), tmp_path / "out", options, progress=crash_in_third_shard)
    assert not (tmp_path / "out").exists()
    resumed = run_merge(parse_recipe(document), tmp_path / "out", options)
    assert resumed.shards_resumed >= 2
    for name in reference.files:
        if name.endswith(".safetensors") or name.endswith(".json"):
            assert (tmp_path / "out" / name).read_bytes() == (
                tmp_path / "reference" / name
            ).read_bytes(), name


def test_a_killed_merge_resumes_to_identical_bytes(models: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from merge_kernels.recipe import parse_recipe
        from merge_kernels.runner import MergeOptions, run_merge
        recipe = parse_recipe({RECIPES["ties"]!r})
        def kill_midway(progress):
            if progress.bytes_done > 70_000:
                os.kill(os.getpid(), signal.SIGKILL)
        options = MergeOptions(base_dir=Path({str(models)!r}), max_shard_bytes=25_000)
        run_merge(recipe, Path({str(tmp_path / "out")!r}), options, progress=kill_midway)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.tureen-partial").is_dir()
    options = MergeOptions(base_dir=models, max_shard_bytes=25_000)
    resumed = run_merge(parse_recipe(RECIPES["ties"]), tmp_path / "out", options)
    assert resumed.shards_resumed >= 2
    fresh = run_merge(parse_recipe(RECIPES["ties"]), tmp_path / "fresh", options)
    for name in fresh.files:
        if name != "README.md":
            assert (tmp_path / "out" / name).read_bytes() == (
                tmp_path / "fresh" / name
            ).read_bytes(), name


def test_existing_output_is_not_overwritten_unless_asked(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(models, RECIPES["linear"], out)
    with pytest.raises(Exception, match="exists"):
        merge(models, RECIPES["linear"], out)
    merge(models, RECIPES["ties"], out, overwrite=True)
    assert "ties" in (out / "tureen_recipe.yaml").read_text()


def test_greedy_soup_is_refused_as_a_plain_merge(models: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="evaluat"):
        merge(
            models,
            {"merge_method": "greedy_soup", "models": [{"model": "ft1"}, {"model": "ft2"}]},
            tmp_path / "out",
        )


# ---- bad inputs: a clear error and nothing left behind ----


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def expect_failure(
    root: Path, document: dict[str, Any], out: Path, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        merge(root, document, out)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_truncated_shard(models: Path, tmp_path: Path) -> None:
    bad = copy_model(models / "ft1", tmp_path / "ft1")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    document = RECIPES["ties"] | {
        "base_model": str(models / "base"),
        "models": [{"model": str(bad)}, {"model": str(models / "ft2")}],
    }
    expect_failure(models, document, tmp_path / "out", CheckpointFileError, "truncated")


def test_header_that_lies_about_offsets(models: Path, tmp_path: Path) -> None:
    bad = copy_model(models / "ft1", tmp_path / "ft1")
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    entry = header["model.norm.weight"]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4]
    body = json.dumps(header).encode()
    body += b" " * (length - len(body)) if len(body) <= length else b""
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(data[8 + length :]))
    document = RECIPES["linear"] | {"models": [{"model": str(bad)}, {"model": str(models / "ft2")}]}
    expect_failure(models, document, tmp_path / "out", CheckpointFileError, "model.norm.weight")


def test_missing_shard_named_in_the_index(models: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    write_checkpoint(sharded, SHAPE, seed=1, base_seed=0, max_shard_bytes=40_000)
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    document = RECIPES["task_arithmetic"] | {
        "base_model": str(models / "base"),
        "models": [{"model": str(sharded)}],
    }
    expect_failure(models, document, tmp_path / "out", CheckpointNotFoundError, shards[1].name)


def test_mismatched_shapes_are_listed_one_by_one(models: Path, tmp_path: Path) -> None:
    other = LlamaShape(hidden_size=32, intermediate_size=80, num_hidden_layers=2, vocab_size=96)
    write_checkpoint(tmp_path / "wide", other, seed=5)
    document = RECIPES["task_arithmetic"] | {
        "base_model": str(models / "base"),
        "models": [{"model": str(tmp_path / "wide")}],
    }
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        merge(models, document, tmp_path / "out")
    problems = caught.value.problems
    assert sum("mlp.up_proj.weight" in p for p in problems) == 2
    assert all("different shapes" in p for p in problems)
    assert not (tmp_path / "out").exists()


def test_missing_base_is_a_recipe_error(models: Path, tmp_path: Path) -> None:
    document = {k: v for k, v in RECIPES["ties"].items() if k != "base_model"}
    expect_failure(models, document, tmp_path / "out", RecipeError, "base_model")


def test_unreadable_or_missing_folder(models: Path, tmp_path: Path) -> None:
    document = RECIPES["linear"] | {
        "models": [{"model": str(tmp_path / "nowhere")}, {"model": str(models / "ft2")}]
    }
    expect_failure(models, document, tmp_path / "out", CheckpointNotFoundError, "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    document = RECIPES["linear"] | {
        "models": [{"model": str(empty)}, {"model": str(models / "ft2")}]
    }
    expect_failure(models, document, tmp_path / "out", CheckpointNotFoundError, "empty")


def test_tied_embeddings(models: Path, tmp_path: Path) -> None:
    tied = LlamaShape(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=96,
        tie_word_embeddings=True,
    )
    write_checkpoint(tmp_path / "tied", tied, seed=4, base_seed=0)
    # untied base, tied model: the model's embeddings stand in for its LM head
    document = RECIPES["task_arithmetic"] | {
        "base_model": str(models / "base"),
        "models": [{"model": str(tmp_path / "tied")}],
    }
    merge(models, document, tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(models / "base" / "model.safetensors")
    model = load_file(tmp_path / "tied" / "model.safetensors")
    expected = base["lm_head.weight"] + 0.8 * (
        model["model.embed_tokens.weight"] - base["lm_head.weight"]
    )
    assert torch.allclose(written["lm_head.weight"], expected, atol=1e-6)


@pytest.mark.parametrize("ties", ["exact_k", "threshold"])
def test_trim_of_a_chunked_tensor_equals_the_whole_tensor_trim(
    models: Path, tmp_path: Path, ties: str
) -> None:
    document = RECIPES["ties"] | {"parameters": {"density": 0.3, "trim_ties": ties}}
    whole = merge(models, document, tmp_path / "whole")
    chunked = merge(
        models, document, tmp_path / "chunked", chunk_elements=500, whole_trim_elements=1000
    )
    assert whole.tensors == chunked.tensors
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    got = load_file(tmp_path / "chunked" / "model.safetensors")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_bf16_ties_at_the_threshold_are_broken_identically_in_chunks(tmp_path: Path) -> None:
    # bf16 task vectors take few distinct values, so many entries tie at the threshold
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(
            tmp_path / name,
            SHAPE,
            seed=seed,
            base_seed=None if name == "base" else 0,
            dtype=torch.bfloat16,
            delta_scale=0.02,
        )
    document = {
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"density": 0.25},
        "models": [{"model": "a"}, {"model": "b"}],
    }
    whole = merge(tmp_path, document, tmp_path / "whole")
    chunked = merge(
        tmp_path, document, tmp_path / "chunked", chunk_elements=300, whole_trim_elements=600
    )
    assert whole.tensors == chunked.tensors
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "chunked" / "model.safetensors"
    ).read_bytes()


def test_model_wide_trim_keeps_the_top_k_of_each_whole_task_vector(
    models: Path, tmp_path: Path
) -> None:
    document = RECIPES["ties"] | {
        "parameters": {"density": 0.2, "trim_scope": "model"},
        "models": [{"model": "ft1"}, {"model": "ft2"}],
    }
    result = merge(models, document, tmp_path / "out", chunk_elements=400)
    written = load_file(result.out_dir / "model.safetensors")
    base = load_file(models / "base" / "model.safetensors")
    names = list(base)
    taus = []
    for folder in ("ft1", "ft2"):
        loaded = load_file(models / folder / "model.safetensors")
        flat = torch.cat([(loaded[n] - base[n]).reshape(-1) for n in names])
        k = int(0.2 * flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat.abs(), k).indices] = True
        taus.append(flat * keep)
    sign = torch.where(taus[0] + taus[1] >= 0, 1.0, -1.0)
    agree = [((t > 0) & (sign > 0)) | ((t < 0) & (sign < 0)) for t in taus]
    merged = (taus[0] * agree[0] + taus[1] * agree[1]) / (
        agree[0].float() + agree[1].float()
    ).clamp(min=1)
    offset = 0
    for name in names:
        count = base[name].numel()
        expected = base[name] + merged[offset : offset + count].reshape(base[name].shape)
        offset += count
        assert torch.allclose(written[name], expected, atol=1e-6), name


def test_a_checkpoint_without_tensors_is_a_plan_problem(models: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    document = RECIPES["linear"] | {"models": [{"model": str(empty)}, {"model": str(empty)}]}
    expect_failure(
        models, document, tmp_path / "out", IncompatibleCheckpointsError, "has no tensors"
    )


def test_models_sharing_no_tensor_shape_are_a_plan_problem(models: Path, tmp_path: Path) -> None:
    other = LlamaShape(hidden_size=16, intermediate_size=48, num_hidden_layers=2, vocab_size=80)
    write_checkpoint(tmp_path / "other", other, seed=5)
    document = RECIPES["linear"] | {
        "models": [{"model": str(models / "ft1")}, {"model": str(tmp_path / "other")}]
    }
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        merge(models, document, tmp_path / "out")
    assert any("would write nothing" in p for p in caught.value.problems)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"reference": "mergekit"}, torch.float32),  # mergekit writes its float32 result
        ({"reference": "mergekit", "out_dtype": "bfloat16"}, torch.bfloat16),
        ({"compute_dtype": "float32"}, torch.bfloat16),  # tureen's default: the dtype
    ],
)
def test_float32_result_methods_write_float32_only_as_mergekit_does(
    models: Path, tmp_path: Path, settings: dict[str, Any], expected: torch.dtype
) -> None:
    recipe = {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": [{"model": "ft1"}, {"model": "ft2"}],
        "dtype": "bfloat16",
    }
    merge(models, recipe | settings, tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {expected}
