"""A tiny Llama-architecture base model that needs no download, built in seconds.

The tokenizer is a byte-level BPE trained locally with the ``tokenizers`` library on a
synthetic corpus (digits split one per token, so sums are learnable), wrapped as a
``PreTrainedTokenizerFast`` with ``<|pad|>`` and ``<|endoftext|>`` and no chat template:
examples are plain ``prompt + completion + eos``. The model is a ``LlamaForCausalLM`` with
random initialisation from the seed, optionally pre-trained for a few hundred steps on
generic synthetic text (:func:`training.tasks.pretraining_text`) so that fine-tunes start
from a shared, non-random base that knows the symbols but none of the tasks.

The folder is written atomically: ``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer files and ``pretraining.json`` (the loss curve).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from merge_kernels.io.staging import StagingDir, write_json_atomic
from training.tasks import pretraining_text

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
PRETRAINING_REPORT = "pretraining.json"


@dataclass(frozen=True)
class TinyBaseSpec:
    """The tiny base's shape and how long it is pre-trained.

    Attributes:
        hidden_size: model width.
        intermediate_size: MLP width.
        num_hidden_layers: decoder layers.
        num_attention_heads: attention heads.
        num_key_value_heads: key/value heads (grouped-query attention when fewer).
        vocab_size: tokenizer vocabulary, 256 bytes + 2 special tokens + BPE merges.
        max_position_embeddings: longest sequence.
        initializer_range: standard deviation of the random initialisation; wider than
            transformers' 0.02 so that so narrow a model can reach confident predictions
            through its final norm (logits scale with the output weights' norm).
        seed: seeds the corpus, the initialisation and the pre-training.
        pretrain_steps: optimizer steps of pre-training (0: random weights).
        pretrain_batch_size: lines per pre-training step.
        pretrain_learning_rate: AdamW learning rate of pre-training (cosine decay).
        corpus_lines: lines of synthetic text the tokenizer and pre-training use.
    """

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 320
    max_position_embeddings: int = 128
    initializer_range: float = 0.1
    seed: int = 0
    pretrain_steps: int = 100
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 3e-3
    corpus_lines: int = 4000


@dataclass
class TinyBaseResult:
    """What was built.

    Attributes:
        folder: the model folder.
        parameters: number of model parameters.
        vocab_size: tokenizer size (the model's embedding rows).
        losses: pre-training loss per step (empty without pre-training).
        seconds: build time.
    """

    folder: Path
    parameters: int
    vocab_size: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> Any:
    """Train a byte-level BPE on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapper: Any = PreTrainedTokenizerFast
    return wrapper(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )


def _pretrain(
    model: Any,
    tokenizer: Any,
    lines: list[str],
    spec: TinyBaseSpec,
    progress: Callable[[int, int, float], None] | None,
) -> list[float]:
    import torch

    encoded = [
        ids[: spec.max_position_embeddings]
        for ids in tokenizer([line + EOS_TOKEN for line in lines])["input_ids"]
    ]
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_learning_rate)
    warmup = max(1, spec.pretrain_steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, spec.pretrain_steps - warmup))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(encoded), generator=generator).tolist()
    cursor = 0
    for step in range(spec.pretrain_steps):
        if cursor + spec.pretrain_batch_size > len(order):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            cursor = 0
        batch = [encoded[i] for i in order[cursor : cursor + spec.pretrain_batch_size]]
        cursor += spec.pretrain_batch_size
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if progress is not None:
            progress(step + 1, spec.pretrain_steps, losses[-1])
    model.eval()
    return losses


def build_tiny_base(
    out_dir: Path,
    spec: TinyBaseSpec | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> TinyBaseResult:
    """Build (and optionally pre-train) the tiny base and save it with its tokenizer.

    Args:
        out_dir: the model folder to write; it appears only once complete.
        spec: shape and pre-training (default :class:`TinyBaseSpec`).
        overwrite: replace an existing ``out_dir``.
        progress: called with ``(step, steps, loss)`` after every pre-training step.

    Returns:
        The folder, parameter count, vocabulary size and pre-training losses.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyBaseSpec()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or overwrite it")
    start = time.perf_counter()
    corpus = pretraining_text(spec.corpus_lines, spec.seed)
    tokenizer = train_tokenizer(corpus, spec.vocab_size, spec.max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    losses = _pretrain(model, tokenizer, corpus, spec, progress) if spec.pretrain_steps else []

    fingerprint = hashlib.sha256(repr(asdict(spec)).encode()).hexdigest()
    staging = StagingDir(out_dir, fingerprint)
    staging.discard()
    staging.prepare()
    try:
        model.save_pretrained(staging.path)
        tokenizer.save_pretrained(staging.path)
        write_json_atomic(
            staging.path / PRETRAINING_REPORT,
            {"spec": asdict(spec), "losses": [round(loss, 6) for loss in losses]},
        )
        staging.commit(overwrite=overwrite)
    except BaseException:
        staging.discard()
        raise
    return TinyBaseResult(
        folder=out_dir,
        parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=len(tokenizer),
        losses=losses,
        seconds=time.perf_counter() - start,
    )
