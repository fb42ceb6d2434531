"""The built-in held-out evaluator for causal language models (transformers).

Metrics, over the completion tokens of every record (for ``{"text"}`` records: every token
after the first):

* ``loss``: mean cross-entropy per token (lower is better);
* ``token_accuracy``: share of tokens the model ranks first, teacher-forced;
* ``exact_match``: share of records whose greedy generation after the prompt equals the
  completion (whitespace-stripped); measured only when it is the chosen metric, since it
  generates.

Each record is the prompt's tokens (with the tokenizer's special tokens) followed by the
completion's tokens and the end-of-sequence token (a text record: its tokens and the
end-of-sequence token), as the training module formats SFT examples. The model is built
once per architecture and each candidate's tensors are loaded into it, so scoring an
in-memory candidate reads nothing from disk. Runs in float32 in evaluation mode, in a fixed
order: the same candidate always gets the same score.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_kernels.candidates import Candidate, Score
from merge_kernels.errors import EvaluationError
from merge_kernels.model_card import TOKENIZER_FILES
from service.evaluation.records import Record

IGNORE = -100
# Models built for evaluation, by (config, device), shared by every evaluator of the process.
_SHARED_MODELS: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_SHARED_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Encoded:
    prompt: list[int]
    completion: list[int]


class HeldOutEvaluator:
    """Scores candidates on held-out records.

    Args:
        records: the held-out examples.
        metric: ``loss``, ``token_accuracy`` or ``exact_match``: the score the soup uses.
        batch_size: records per forward pass.
        max_length: longest sequence; longer prompts lose their beginning.
        max_new_tokens: generation length for exact match (default: longest completion + 1).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        metric: str = "loss",
        batch_size: int = 16,
        max_length: int = 512,
        max_new_tokens: int | None = None,
        device: str = "cpu",
    ) -> None:
        if not records:
            raise EvaluationError("the held-out evaluator needs at least one record")
        self.records = list(records)
        self.metric = metric
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.name = f"held_out:{metric}"
        self.higher_is_better = metric != "loss"
        self._tokenizers: dict[str, Any] = {}
        self._encoded: dict[str, list[_Encoded]] = {}

    # -- what a candidate needs ---------------------------------------------------------

    def _tokenizer(self, folder: Path | None) -> tuple[str, Any]:
        if folder is None:
            raise EvaluationError("the candidate has no tokenizer files to evaluate with")
        digest = hashlib.sha256()
        for name in TOKENIZER_FILES:
            path = folder / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        key = digest.hexdigest()
        if key not in self._tokenizers:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as error:
                raise EvaluationError(
                    f"cannot load the tokenizer of the inputs ({error}); the held-out "
                    "evaluator needs tokenizer files next to the weights"
                ) from None
            self._tokenizers[key] = tokenizer
        return key, self._tokenizers[key]

    def _encode(self, key: str, tokenizer: Any) -> list[_Encoded]:
        if key not in self._encoded:
            eos = tokenizer.eos_token_id
            encoded = []
            for record in self.records:
                prompt = tokenizer(record.prompt)["input_ids"] if record.prompt else []
                completion = tokenizer(record.completion, add_special_tokens=not record.prompt)[
                    "input_ids"
                ]
                if eos is not None:
                    completion = [*completion, eos]
                budget = max(1, self.max_length - len(completion))
                encoded.append(_Encoded(list(prompt)[-budget:], list(completion)))
            self._encoded[key] = encoded
        return self._encoded[key]

    def _model(self, config: Mapping[str, object]) -> tuple[Any, threading.Lock]:
        """The model for ``config`` on this device, shared by every evaluator in the process.

        Each evaluation loads the candidate's tensors into it first, so sharing changes no
        score; it saves a model's worth of memory per extra evaluator (one per held-out
        task, say). The lock keeps two evaluations from loading into it at once.
        """
        ignored = {"torch_dtype", "dtype", "transformers_version", "_name_or_path"}
        settings = {k: v for k, v in config.items() if k not in ignored}
        key = (json.dumps(settings, sort_keys=True), str(self.device))
        with _SHARED_LOCK:
            if key not in _SHARED_MODELS:
                from transformers import AutoConfig, AutoModelForCausalLM

                model_type = settings.pop("model_type", None)
                if not isinstance(model_type, str):
                    raise EvaluationError("the candidate's config.json has no model_type")
                try:
                    model_config = AutoConfig.for_model(model_type, **settings)
                    model = AutoModelForCausalLM.from_config(model_config)  # type: ignore[no-untyped-call]
                except (ValueError, KeyError) as error:
                    raise EvaluationError(
                        f"cannot build a causal LM for model_type {model_type!r}: {error}"
                    ) from None
                model = model.to(device=self.device, dtype=torch.float32).eval()
                _SHARED_MODELS[key] = (model, threading.Lock())
            return _SHARED_MODELS[key]

    def _load(self, model: Any, tensors: Mapping[str, torch.Tensor]) -> None:
        result = model.load_state_dict(dict(tensors), strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        missing = [name for name in result.missing_keys if name not in tied]
        if missing or result.unexpected_keys:
            raise EvaluationError(
                "the candidate's tensors do not fit its architecture: "
                f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
            )
        if tied:
            model.tie_weights()

    # -- scoring ------------------------------------------------------------------------

    def evaluate(self, candidate: Candidate) -> Score:
        """Score ``candidate`` on the held-out records."""
        key, tokenizer = self._tokenizer(candidate.tokenizer_folder())
        encoded = self._encode(key, tokenizer)
        model, lock = self._model(candidate.config())
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        with lock:
            self._load(model, candidate.tensors())
            with torch.inference_mode():
                loss, accuracy = self._teacher_forced(model, encoded, pad)
                metrics = {"loss": loss, "token_accuracy": accuracy}
                if self.metric == "exact_match":
                    metrics["exact_match"] = self._exact_match(model, tokenizer, encoded, pad)
        return Score(metrics[self.metric], metrics)

    def _batches(self, encoded: list[_Encoded]) -> list[list[int]]:
        positions = list(range(len(encoded)))
        return [
            positions[i : i + self.batch_size] for i in range(0, len(positions), self.batch_size)
        ]

    def _teacher_forced(self, model: Any, encoded: list[_Encoded], pad: int) -> tuple[float, float]:
        total_loss = 0.0
        correct = 0
        count = 0
        for batch in self._batches(encoded):
            rows = [encoded[i] for i in batch]
            length = max(len(r.prompt) + len(r.completion) for r in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for j, row in enumerate(rows):
                sequence = row.prompt + row.completion
                ids[j, : len(sequence)] = torch.tensor(sequence)
                mask[j, : len(sequence)] = 1
                first = len(row.prompt) if row.prompt else 1
                labels[j, first : len(sequence)] = torch.tensor(sequence[first:])
            logits = model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            targets = labels[:, 1:].reshape(-1).to(self.device)
            scored = targets != IGNORE
            total_loss += float(
                torch.nn.functional.cross_entropy(shifted[scored], targets[scored], reduction="sum")
            )
            correct += int((shifted[scored].argmax(-1) == targets[scored]).sum())
            count += int(scored.sum())
        if count == 0:
            raise EvaluationError("no held-out tokens to score (every completion is empty)")
        return total_loss / count, correct / count

    def _exact_match(self, model: Any, tokenizer: Any, encoded: list[_Encoded], pad: int) -> float:
        longest = max(len(r.completion) for r in encoded)
        new_tokens = self.max_new_tokens or longest + 1
        eos = tokenizer.eos_token_id
        hits = 0
        for batch in self._batches(encoded):
            rows = [encoded[i] for i in batch]
            length = max(len(r.prompt) for r in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for j, row in enumerate(rows):  # left padding: every prompt ends at the same column
                ids[j, length - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
                mask[j, length - len(row.prompt) :] = 1
            generated = _greedy(
                model, ids.to(self.device), mask.to(self.device), new_tokens, eos, pad
            )
            for j, index in enumerate(batch):
                produced = generated[j].tolist()
                if eos is not None and eos in produced:
                    produced = produced[: produced.index(eos)]
                text = tokenizer.decode(produced, skip_special_tokens=True).strip()
                expected = self.records[index].completion.strip()
                hits += text == expected
        return hits / len(encoded)


def _greedy(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: int | None, pad: int
) -> torch.Tensor:
    """Greedy decoding of left-padded prompts; returns only the new tokens."""
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    new: torch.Tensor = output[:, ids.shape[1] :]
    return new
