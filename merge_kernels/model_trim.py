"""The TIES paper's model-wide trim: one magnitude threshold per model, over all its tensors.

PEFT and mergekit trim each tensor to its own top-k; the paper keeps the top-k of each
model's whole flattened task vector. Finding that threshold needs passes over every task
vector before the merge: a streaming radix select (two or three reads of each input), then,
when entries tie at the threshold and ``exact_k`` must choose among them, one more pass to
count the ties that precede each tensor in the model's flat order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import (
    MagnitudeThreshold,
    StreamingMagnitudeSelect,
    apply_threshold_mask,
)
from merge_kernels.methods.task_arithmetic import SparseModelParams, TiesParams
from merge_kernels.plan import MergePlan, TensorPlan


def _uses_model_scope(plan: MergePlan) -> bool:
    return any(
        isinstance(t.params.method, TiesParams) and t.params.method.trim_scope == "model"
        for t in plan.tensors
        if t.params is not None
    )


def _task_vectors(plan: MergePlan, tensor: TensorPlan) -> list[torch.Tensor]:
    base = plan.inputs[0].checkpoint.read(tensor.sources[0]).float()
    return [
        (item.checkpoint.read(source).float() - base).reshape(-1)
        for item, source in zip(plan.inputs[1:], tensor.sources[1:], strict=True)
    ]


def model_trim_states(
    plan: MergePlan, check_cancel: Callable[[], None], report: Callable[[], None]
) -> dict[str, tuple[TrimState, ...]]:
    """Per tensor, each model's trim state under a model-wide trim; empty if not used.

    The density of each model is the one its parameters give for the first merged tensor:
    a model-wide threshold has one density by definition.
    """
    if not _uses_model_scope(plan):
        return {}
    tensors = [t for t in plan.tensors if t.params is not None]
    total = sum(t.numel for t in tensors)
    first = tensors[0].params
    assert first is not None
    densities = [
        p.density if isinstance(p, SparseModelParams) and p.density is not None else 1.0
        for p in first.models
    ]
    selectors = [StreamingMagnitudeSelect(total, min(total, int(d * total))) for d in densities]
    while any(s.needs_pass() for s in selectors):
        for tensor in tensors:
            check_cancel()
            for selector, tau in zip(selectors, _task_vectors(plan, tensor), strict=True):
                if selector.needs_pass():
                    selector.update(tau)
            report()
        for selector in selectors:
            if selector.needs_pass():
                selector.end_pass()
    thresholds = [s.result() for s in selectors]
    ties_method = first.method.trim_ties if isinstance(first.method, TiesParams) else "exact_k"
    return _with_ties_before(plan, tensors, thresholds, ties_method, check_cancel)


def _with_ties_before(
    plan: MergePlan,
    tensors: list[TensorPlan],
    thresholds: list[MagnitudeThreshold],
    ties: str,
    check_cancel: Callable[[], None],
) -> dict[str, tuple[TrimState, ...]]:
    needs_count = ties == "exact_k" and any(
        t.keep_at_value > 0 and t.value != float("inf") for t in thresholds
    )
    seen = [0] * len(thresholds)
    states: dict[str, tuple[TrimState, ...]] = {}
    for tensor in tensors:
        states[tensor.name] = tuple(
            TrimState(threshold=threshold, ties_before=count)
            for threshold, count in zip(thresholds, seen, strict=True)
        )
        if needs_count:
            check_cancel()
            for index, tau in enumerate(_task_vectors(plan, tensor)):
                _, seen[index] = apply_threshold_mask(tau, thresholds[index], seen[index])
    return states
