"""The greedy soup's search (Wortsman et al. 2022, recipe 2), in O(N) model reads.

1. Score every ingredient alone; sort best first. The soup starts as the best one.
2. For each next ingredient: candidate = (running float32 sum of the kept + it) / (k + 1).
   Keep it only if the candidate beats the best score (``>`` as the reference code, or
   ``>=``); then the candidate's score is the best.

Each step reads only the new ingredient: the kept ones live in the running sum, so N
ingredients cost 2N model reads (N to score them alone, N to build the soup) instead of the
naive loop's O(N²). Candidates are evaluated in the output dtype, as they would be written.

Models whose working set (two float32 copies and a candidate) fits ``memory_limit_bytes``
are searched in memory and no candidate touches the disk unless the evaluator asks for a
folder. Larger models keep the running sum as a float32 checkpoint in the scratch folder and
every candidate is written by the streaming engine (sum and new ingredient in, candidate
out), so the memory stays bounded and the reads stay O(N).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_kernels.candidates import Candidate, Evaluator, Score, finite_or_none, is_better
from merge_kernels.checkpoints.local import LocalCheckpoint
from merge_kernels.errors import MergeCancelledError
from merge_kernels.io.dtypes import torch_dtype
from merge_kernels.plan import MergePlan
from merge_kernels.recipe import ModelReference, Recipe, parse_recipe

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_BYTES = 4 * 1024**3
SCORES_IN_FLIGHT = 4  # ingredients scored at once with an asynchronous scorer
StepCallback = Callable[[str], None]
# Starts scoring a candidate elsewhere (e.g. a Ray task on a GPU node) and returns at once.
ScoreAsync = Callable[[Candidate], "Future[Score]"]


@dataclass
class SoupStep:
    """One candidate of the search after the first ingredient."""

    step: int
    ingredient: str
    score: Score
    kept: bool
    soup: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ingredient": self.ingredient,
            "candidate_score": finite_or_none(self.score.value),
            "metrics": self.score.to_dict()["metrics"],
            "kept": self.kept,
            "soup_after": list(self.soup),
        }


@dataclass
class SearchResult:
    """What the search found.

    Attributes:
        ingredient_scores: each ingredient's score alone, in recipe order.
        order: ingredient positions, best first.
        steps: one entry per candidate after the first ingredient.
        kept: positions of the kept ingredients, in the order they were added.
        best: the soup's score (the last kept candidate's).
        bytes_read: bytes of input tensors read by the search.
        model_bytes: bytes of one ingredient.
        in_memory: whether candidates were held in memory.
    """

    references: list[str]
    ingredient_scores: list[Score]
    order: list[int]
    steps: list[SoupStep] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    best: float = math.nan
    bytes_read: int = 0
    model_bytes: int = 0
    in_memory: bool = True

    def report(self, evaluator: Evaluator, keep_rule: str) -> dict[str, Any]:
        """The search as JSON-able data."""
        best_single = self.order[0]
        return {
            "evaluator": evaluator.name,
            "higher_is_better": evaluator.higher_is_better,
            "keep_rule": keep_rule,
            "ingredients": [
                {"index": i, "reference": ref, **score.to_dict()}
                for i, (ref, score) in enumerate(
                    zip(self.references, self.ingredient_scores, strict=True)
                )
            ],
            "order": [self.references[i] for i in self.order],
            "steps": [step.to_dict() for step in self.steps],
            "kept": [self.references[i] for i in self.kept],
            "best_single": {
                "reference": self.references[best_single],
                "score": finite_or_none(self.ingredient_scores[best_single].value),
            },
            "soup_score": finite_or_none(self.best),
            "evaluations": len(self.ingredient_scores) + len(self.steps),
            "bytes_read": self.bytes_read,
            "model_bytes": self.model_bytes,
            "in_memory": self.in_memory,
        }


def working_set_bytes(plan: MergePlan) -> int:
    """Memory an in-memory search needs: a float32 sum, a float32 ingredient, a candidate."""
    elements = sum(t.numel for t in plan.tensors)
    return elements * 8 + plan.output_bytes


class _Search:
    """State shared by the in-memory and the on-disk search."""

    def __init__(
        self,
        plan: MergePlan,
        evaluator: Evaluator,
        *,
        keep_rule: str,
        max_ingredients: int | None,
        scratch: Path,
        on_step: StepCallback | None,
        should_cancel: Callable[[], bool] | None,
        score_async: ScoreAsync | None = None,
    ) -> None:
        self.plan = plan
        self.score_async = score_async
        self.evaluator = evaluator
        self.allow_equal = keep_rule == ">="
        self.keep_rule = keep_rule
        self.max_ingredients = max_ingredients
        self.scratch = scratch
        self.on_step = on_step
        self.should_cancel = should_cancel
        self.references = [item.checkpoint.display_name for item in plan.inputs]
        self.companion = plan.inputs[0].checkpoint
        self.evaluations = 0

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise MergeCancelledError("the greedy soup was cancelled; no output was written")

    def announce(self, text: str) -> None:
        log.info("greedy soup: %s", text)
        if self.on_step is not None:
            self.on_step(text)

    def score(self, candidate: Candidate) -> Score:
        return self.collect(*self.submit(candidate))

    def submit(self, candidate: Candidate) -> tuple[Future[Score], Path | None]:
        """Start scoring ``candidate``: elsewhere with ``score_async``, else here and now.

        Returns the score's future and the folder written for it here, if any.
        """
        self.check_cancel()
        if self.score_async is not None:
            return self.score_async(candidate), candidate.written_folder
        done: Future[Score] = Future()
        done.set_result(self.evaluator.evaluate(candidate))
        return done, candidate.written_folder

    def collect(self, future: Future[Score], written: Path | None) -> Score:
        """The score of a submitted candidate, once it is known."""
        score = future.result()
        self.evaluations += 1
        # A candidate written for the evaluator is not needed again: keep the disk bounded.
        self.discard(written)
        return score

    def discard(self, folder: Path | str | None) -> None:
        """Remove a folder this search wrote (never anything outside its scratch folder)."""
        if folder is None:
            return
        path = Path(folder)
        if path.resolve().is_relative_to(self.scratch.resolve()) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

    def better(self, score: float, best: float) -> bool:
        return is_better(
            score,
            best,
            higher_is_better=self.evaluator.higher_is_better,
            allow_equal=self.allow_equal,
        )

    def ranked(self, scores: list[Score]) -> list[int]:
        """Positions best first; NaN last; ties keep recipe order."""
        sign = -1.0 if self.evaluator.higher_is_better else 1.0

        def key(i: int) -> tuple[bool, float]:
            value = scores[i].value
            return (math.isnan(value), sign * value if not math.isnan(value) else 0.0)

        return sorted(range(len(scores)), key=key)


def read_model(plan: MergePlan, position: int) -> tuple[dict[str, torch.Tensor], int]:
    """Every output tensor of one planned input, as float32 (copied tensors as stored).

    Returns:
        The tensors by output name, and the bytes of input tensors read.
    """
    checkpoint = plan.inputs[position].checkpoint
    fallback = plan.inputs[0].checkpoint
    entries = checkpoint.entries()
    tensors: dict[str, torch.Tensor] = {}
    read = 0
    for tensor in plan.tensors:
        if tensor.params is None:
            tensors[tensor.name] = fallback.read(tensor.sources[0])
            continue
        source = tensor.sources[position]
        tensors[tensor.name] = checkpoint.read(source).to(torch.float32)
        read += entries[source].nbytes
    return tensors, read


def as_output(
    plan: MergePlan, tensors: Mapping[str, torch.Tensor], divisor: int = 1
) -> dict[str, torch.Tensor]:
    """Float32 tensors divided by ``divisor`` and cast to the plan's output dtypes."""
    out: dict[str, torch.Tensor] = {}
    for tensor in plan.tensors:
        value = tensors[tensor.name]
        if tensor.params is not None:
            value = (value / divisor) if divisor != 1 else value
            value = value.to(torch_dtype(tensor.dtype))
        out[tensor.name] = value
    return out


class _InMemorySearch(_Search):
    def _continues(self, step: int, steps: int, result: SearchResult) -> bool:
        """Whether the step after ``step`` runs, whether or not this one is kept."""
        room = self.max_ingredients is None or len(result.kept) + 1 < self.max_ingredients
        return step < steps and room

    def read_model(self, position: int, result: SearchResult) -> dict[str, torch.Tensor]:
        tensors, read = read_model(self.plan, position)
        result.bytes_read += read
        self.check_cancel()
        return tensors

    def as_output(
        self, tensors: Mapping[str, torch.Tensor], divisor: int
    ) -> dict[str, torch.Tensor]:
        return as_output(self.plan, tensors, divisor)

    def candidate(
        self, label: str, step: int, refs: list[str], tensors: dict[str, torch.Tensor]
    ) -> Candidate:
        return Candidate(
            label, step, refs, tensors=tensors, companion=self.companion, scratch=self.scratch
        )

    def run(self) -> SearchResult:
        count = len(self.plan.inputs)
        scores: list[Score] = []
        result = SearchResult(self.references, scores, [], in_memory=True)
        pending: deque[tuple[Future[Score], Path | None]] = deque()
        for position in range(count):
            self.announce(f"scoring ingredient {position + 1}/{count}: {self.references[position]}")
            model = self.read_model(position, result)
            refs = [self.references[position]]
            label = f"ingredient {position}"
            pending.append(
                self.submit(self.candidate(label, position, refs, self.as_output(model, 1)))
            )
            del model
            while len(pending) >= SCORES_IN_FLIGHT or (pending and pending[0][0].done()):
                scores.append(self.collect(*pending.popleft()))
        scores.extend(self.collect(*pending.popleft()) for _ in range(len(pending)))
        result.model_bytes = result.bytes_read // max(1, count)
        result.order = self.ranked(scores)
        first = result.order[0]
        result.kept = [first]
        result.best = scores[first].value
        running = self.read_model(first, result)
        order = result.order[1:]
        upcoming: dict[str, torch.Tensor] | None = None
        for step, position in enumerate(order, start=1):
            if self.max_ingredients is not None and len(result.kept) >= self.max_ingredients:
                break
            self.announce(f"soup step {step}/{count - 1}: trying {self.references[position]}")
            new = upcoming if upcoming is not None else self.read_model(position, result)
            upcoming = None
            divisor = len(result.kept) + 1
            candidate: dict[str, torch.Tensor] = {}
            for tensor in self.plan.tensors:  # one float32 temporary at a time
                if tensor.params is None:
                    candidate[tensor.name] = running[tensor.name]
                    continue
                summed = torch.add(running[tensor.name], new[tensor.name]).div_(divisor)
                candidate[tensor.name] = summed.to(torch_dtype(tensor.dtype))
                del summed
            refs = [self.references[i] for i in [*result.kept, position]]
            label = f"soup step {step}"
            submitted = self.submit(self.candidate(label, count + step - 1, refs, candidate))
            del candidate
            if self.score_async is not None and self._continues(step, len(order), result):
                upcoming = self.read_model(order[step], result)  # while the candidate is scored
            score = self.collect(*submitted)
            kept = self.better(score.value, result.best)
            if kept:
                for tensor in self.plan.tensors:
                    if tensor.params is not None:
                        running[tensor.name].add_(new[tensor.name])
                result.kept.append(position)
                result.best = score.value
            del new
            result.steps.append(
                SoupStep(
                    step,
                    self.references[position],
                    score,
                    kept,
                    [self.references[i] for i in result.kept],
                )
            )
        return result


def search_greedy_soup(
    plan: MergePlan,
    evaluator: Evaluator,
    *,
    keep_rule: str = ">",
    max_ingredients: int | None = None,
    scratch: Path,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    run_linear: Callable[[Recipe, Path], None] | None = None,
    score_async: ScoreAsync | None = None,
) -> SearchResult:
    """Choose the soup's ingredients.

    Args:
        plan: the greedy soup's plan (its inputs are the ingredients), without problems.
        evaluator: scores candidates.
        keep_rule: ``>`` (the reference code) or ``>=``.
        max_ingredients: stop once the soup holds this many.
        scratch: a folder for candidates written to disk.
        memory_limit_bytes: search in memory when the working set fits.
        on_step: called with a description before each evaluation.
        should_cancel: polled between steps.
        run_linear: runs an engine merge of a recipe into a folder (the on-disk search).
        score_async: scores candidates elsewhere (e.g. :class:`~merge_kernels.executors.
            ray_soup.RayScorer`): ingredients are then scored several at once, and the next
            ingredient is read while a soup candidate is scored; the result is the same.

    Returns:
        The ingredients' scores, every step, and the kept ingredients.
    """
    common: dict[str, Any] = {
        "keep_rule": keep_rule,
        "max_ingredients": max_ingredients,
        "scratch": scratch,
        "on_step": on_step,
        "should_cancel": should_cancel,
        "score_async": score_async,
    }
    if working_set_bytes(plan) <= memory_limit_bytes or run_linear is None:
        return _InMemorySearch(plan, evaluator, **common).run()
    return _OnDiskSearch(plan, evaluator, run_linear=run_linear, **common).run()


class _OnDiskSearch(_Search):
    """The search for models too large for memory: the running sum is a checkpoint."""

    def __init__(
        self,
        plan: MergePlan,
        evaluator: Evaluator,
        *,
        run_linear: Callable[[Recipe, Path], None],
        **common: Any,
    ) -> None:
        super().__init__(plan, evaluator, **common)
        self.run_linear = run_linear
        self.entries: list[ModelReference] = []
        recipe = plan.recipe
        for _, entry in recipe.merged_models():
            self.entries.append(entry.model)
        self.out_dtype = next((t.dtype for t in plan.tensors if t.params is not None), "F32")
        self.folders = 0
        self.sum_bytes = 4 * sum(t.numel for t in plan.tensors if t.params is not None)

    def merge(self, models: list[tuple[ModelReference | str, float]], dtype: str) -> Path:
        """One engine merge: Σ wᵢ·modelᵢ (not normalized) in ``dtype`` into a new folder."""
        self.folders += 1
        out = self.scratch / f"merge-{self.folders:04d}"
        document: dict[str, Any] = {
            "merge_method": "linear",
            "models": [
                {"model": reference_document(ref), "parameters": {"weight": weight}}
                for ref, weight in models
            ],
            "parameters": {"normalize": False},
            "out_dtype": dtype,
            "tokenizer_source": reference_document(self.entries[0]),
        }
        self.run_linear(parse_recipe(document), out)
        return out

    def as_written(self, position: int) -> Path | None:
        """The ingredient's own folder, when it already holds exactly what the engine would
        write (safetensors, same tensor names, the output dtype): no copy is needed then."""
        checkpoint = self.plan.inputs[position].checkpoint
        if not isinstance(checkpoint, LocalCheckpoint):
            return None
        if any(path.suffix != ".safetensors" for path in checkpoint.files()):
            return None
        entries = checkpoint.entries()
        if len(entries) != len(self.plan.tensors):
            return None
        for tensor in self.plan.tensors:
            source = entries.get(tensor.name)
            if source is None or tensor.sources[position] != tensor.name:
                return None
            if source.dtype != tensor.dtype:
                return None
        return checkpoint.folder

    def model_bytes(self) -> int:
        return sum(e.nbytes for e in self.plan.inputs[0].checkpoint.entries().values())

    def run(self) -> SearchResult:
        dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[self.out_dtype]
        count = len(self.plan.inputs)
        scores: list[Score] = []
        result = SearchResult(self.references, scores, [], in_memory=False)
        result.model_bytes = self.model_bytes()
        for position in range(count):
            self.announce(f"scoring ingredient {position + 1}/{count}: {self.references[position]}")
            folder = self.as_written(position)
            if folder is None:
                folder = self.merge([(self.entries[position], 1.0)], dtype)
                result.bytes_read += result.model_bytes
            refs = [self.references[position]]
            scores.append(
                self.score(Candidate(f"ingredient {position}", position, refs, folder=folder))
            )
        result.order = self.ranked(scores)
        first = result.order[0]
        result.kept = [first]
        result.best = scores[first].value
        running: ModelReference | str = str(self.merge([(self.entries[first], 1.0)], "float32"))
        result.bytes_read += result.model_bytes
        for step, position in enumerate(result.order[1:], start=1):
            if self.max_ingredients is not None and len(result.kept) >= self.max_ingredients:
                break
            self.announce(f"soup step {step}/{count - 1}: trying {self.references[position]}")
            weight = 1.0 / (len(result.kept) + 1)
            folder = self.merge([(running, weight), (self.entries[position], weight)], dtype)
            result.bytes_read += self.sum_bytes + result.model_bytes
            refs = [self.references[i] for i in [*result.kept, position]]
            score = self.score(
                Candidate(f"soup step {step}", count + step - 1, refs, folder=folder)
            )
            kept = self.better(score.value, result.best)
            if kept:
                previous = running
                running = str(
                    self.merge([(running, 1.0), (self.entries[position], 1.0)], "float32")
                )
                self.discard(str(previous))
                result.bytes_read += self.sum_bytes + result.model_bytes
                result.kept.append(position)
                result.best = score.value
            result.steps.append(
                SoupStep(
                    step,
                    self.references[position],
                    score,
                    kept,
                    [self.references[i] for i in result.kept],
                )
            )
        return result


def reference_document(reference: ModelReference | str) -> Any:
    """A reference as it is written in a recipe document."""
    if isinstance(reference, str):
        return reference
    return reference.model_dump(mode="json", exclude_none=True)


def soup_recipe(recipe: Recipe, kept: list[int]) -> Recipe:
    """The uniform soup of the kept ingredients as a linear recipe for the engine.

    Args:
        recipe: the greedy soup recipe.
        kept: positions of the kept ingredients among the recipe's merged models.
    """
    merged = recipe.merged_models()
    first = merged[0][1].model
    document: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": reference_document(merged[i][1].model)} for i in kept],
        "tokenizer_source": reference_document(
            first
            if recipe.tokenizer_source is None or str(recipe.tokenizer_source) == "base"
            else recipe.tokenizer_source
        ),
        "seed": recipe.seed,
    }
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None:
            document[key] = value
    return parse_recipe(document)
