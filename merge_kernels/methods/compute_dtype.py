"""Merging in the recipe's dtype, with mergekit 0.1.5's arithmetic (``compute_dtype: dtype``).

By default tureen widens every input to float32, computes, and rounds once to the output
dtype. mergekit instead loads the inputs in the config's ``dtype`` (their stored dtype when
it is unset, promoted across the inputs) and then, per method
(``mergekit/merge_methods/{linear,slerp,generalized_task_arithmetic}.py``, ``sparsify.py``):

- ``linear``: accumulates Σ wᵢ·xᵢ in float32 (``addcmul``), divides by Σ wᵢ in float32 and
  rounds to the dtype;
- ``slerp``: norms, dot product and coefficients in float32 (``t`` rounded to float32
  too), the result rounded to the dtype;
- task arithmetic, TIES, DARE: everything in the dtype itself, rounding at each step:
  τᵢ = θᵢ − θ₀, the sparsified τᵢ, the weights (rounded to the dtype), wᵢ·τᵢ, the vote,
  the masked sums over the models, the division, the scale λ, and θ₀ + the result.

This module reproduces that order of operations, so that ``reference: mergekit`` gives
mergekit's numbers, not only its formulas; ``compute_dtype_sparse`` (DELLA, Breadcrumbs,
SCE) and ``compute_dtype_geometric`` (Model Stock, RAM, NuSLERP, Karcher, Multi-SLERP,
NearSwap, Arcee Fusion) do the same for the other methods, each following its mergekit
implementation. The options stay tureen's (a sign election on unweighted task vectors, a
count divisor... work here too); what tureen chooses on its own is which entries survive:
DARE's and DELLA's masks are tureen's (mergekit draws them from torch's global generator)
and entries tied at the trim threshold are chosen by ``trim_ties`` (mergekit's ``argsort``
leaves the choice unspecified). A method without an arithmetic in these tables
(``greedy_soup``; ``passthrough`` only copies) runs its float32 kernel on the inputs
rounded to the dtype, and its result is rounded to the dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from merge_kernels.methods.compute_dtype_geometric import ARITHMETIC as GEOMETRIC_ARITHMETIC
from merge_kernels.methods.compute_dtype_sparse import (
    breadcrumbs_in_dtype,
    combine_in_dtype,
    della_in_dtype,
    sce_in_dtype,
)
from merge_kernels.methods.kernel import MergeInputs, MethodParams, TensorContext
from merge_kernels.methods.magnitude_select import apply_threshold_mask, top_k_magnitude_mask
from merge_kernels.methods.steps import (
    random_drop,
    trim_count,
)
from merge_kernels.methods.task_arithmetic import DareRescaleParams, TiesParams
from merge_kernels.recipe import Recipe

_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_ARITHMETIC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def computes_in_dtype(recipe: Recipe) -> bool:
    """Whether the recipe's merge runs in its dtype (``compute_dtype: dtype``, the default
    with ``reference: mergekit``) rather than in float32."""
    if recipe.compute_dtype is not None:
        return recipe.compute_dtype == "dtype"
    return recipe.reference == "mergekit"


def compute_dtype(recipe: Recipe, inputs: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a merge of ``inputs`` computes in.

    float32 unless the recipe computes in its dtype; then ``dtype``, or, when the recipe
    leaves it unset, the inputs' stored dtypes promoted together (mergekit's rule; float32
    for float8 inputs).
    """
    if not computes_in_dtype(recipe):
        return torch.float32
    if recipe.dtype is not None:
        return _NAMES[recipe.dtype]
    dtype = inputs[0].dtype
    for tensor in inputs[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    # float8 has almost no arithmetic in torch: such inputs are merged in float32
    return dtype if dtype in _ARITHMETIC_DTYPES else torch.float32


# mergekit's methods whose result is float32 whatever the inputs' dtype (a float32 mask or
# float32 scales promote it); with out_dtype unset, mergekit writes that float32 result as is.
_FLOAT32_RESULT = frozenset({"arcee_fusion", "ramplus_tl"})


def result_dtype(recipe: Recipe) -> str | None:
    """The dtype mergekit writes a merge's tensors in when the recipe leaves ``out_dtype``
    unset and computes in its dtype: ``"float32"`` for the methods whose result is float32
    (``arcee_fusion``, ``ramplus_tl``), else None (the recipe's output dtype applies)."""
    float32 = recipe.merge_method in _FLOAT32_RESULT
    if float32 and recipe.out_dtype is None and computes_in_dtype(recipe):
        return "float32"
    return None


def merge_in_dtype(
    method: str,
    kernel: Callable[..., torch.Tensor],
    inputs: MergeInputs,
    params: Any,
    ctx: TensorContext,
) -> torch.Tensor:
    """The merge of ``inputs`` (all already in the compute dtype) as mergekit computes it.

    Args:
        method: the method's registered name.
        kernel: the method's own float32 kernel (for methods without an arithmetic here).
        inputs: the tensors in the compute dtype, and their parameters.
        params: the method's parameters.
        ctx: the tensor context (name, seed, trims...).

    Returns:
        The merged tensor, in the compute dtype.
    """
    dtype = (inputs.base if inputs.base is not None else inputs.models[0]).dtype
    arithmetic = _ARITHMETIC.get(method)
    if arithmetic is not None:
        return arithmetic(inputs, params, ctx)
    widened = MergeInputs(
        base=inputs.base.float() if inputs.base is not None else None,
        models=[model.float() for model in inputs.models],
        model_params=inputs.model_params,
    )
    return kernel(widened, params, ctx).to(dtype)


def _linear(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
    """mergekit's ``linear_merge``: float32 ``addcmul`` accumulation, rounded to the dtype."""
    first = inputs.models[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    shape = (1,) * first.dim()
    weights = torch.tensor(
        [float(getattr(p, "weight", 1.0)) for p in inputs.model_params], dtype=work
    )
    result = torch.zeros_like(first, dtype=work)
    for tensor, weight in zip(inputs.models, weights.unbind(0), strict=True):
        result.addcmul_(tensor, weight.reshape(shape))
    if params.normalize:
        result.div_(weights.sum().reshape(shape))
    return result.to(first.dtype)


_SLERP_CHUNK = 1024 * 1024  # mergekit's chunk: it sums the dot product chunk by chunk


def _slerp(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
    """mergekit's ``slerp``: float32 norms, dot and coefficients, rounded to the dtype."""
    if inputs.base is None or len(inputs.models) != 1:
        raise ValueError("slerp merges exactly two models: the base and one other")
    v0, v1 = inputs.base, inputs.models[0]
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([params.t], dtype=work).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    spans = [(start, start + _SLERP_CHUNK) for start in range(0, a.shape[1], _SLERP_CHUNK)]
    norm_a = _chunked_norm(a, spans, work)
    norm_b = _chunked_norm(b, spans, work)
    norm_a = torch.where(norm_a > params.eps, norm_a, 1)
    norm_b = torch.where(norm_b > params.eps, norm_b, 1)
    parts = [
        ((a[:, i:j].to(work) / norm_a) * (b[:, i:j].to(work) / norm_b)).sum(dim=1, keepdim=True)
        for i, j in spans
    ]
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > params.dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for i, j in spans:
        result[:, i:j] = coef_a * a[:, i:j].to(work) + coef_b * b[:, i:j].to(work)
    return result.reshape(v0.shape)


def _chunked_norm(x: torch.Tensor, spans: list[tuple[int, int]], work: torch.dtype) -> torch.Tensor:
    """The L2 norm of each row as mergekit takes it: the norm of the chunks' norms."""
    parts = [torch.linalg.vector_norm(x[:, i:j].to(work), dim=1, keepdim=True) for i, j in spans]
    norm: torch.Tensor = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return norm


def _sparsified(
    inputs: MergeInputs, params: MethodParams, ctx: TensorContext
) -> list[torch.Tensor]:
    """Each model's task vector in the dtype, trimmed (TIES) or dropped (DARE)."""
    base = inputs.base
    if base is None:
        raise ValueError("task-vector methods need the base model's tensor")
    taus = []
    for position, (model, model_params) in enumerate(
        zip(inputs.models, inputs.model_params, strict=True)
    ):
        tau = model - base
        density = getattr(model_params, "density", None) or 1.0
        if isinstance(params, TiesParams):
            tau = _trim(tau, density, params, ctx, position)
        elif isinstance(params, DareRescaleParams) and density < 1.0:
            tau = random_drop(
                tau,
                density,
                seed=ctx.seed,
                model_index=ctx.model_index(position),
                tensor_name=ctx.name,
                offset=ctx.offset,
                rescale=params.rescale_method if params.rescale else "none",
            )
        taus.append(tau)
    return taus


def _trim(
    tau: torch.Tensor, density: float, params: TiesParams, ctx: TensorContext, position: int
) -> torch.Tensor:
    """TIES' magnitude trim of a task vector in the dtype (its magnitudes ranked exactly)."""
    if ctx.trims is not None:
        state = ctx.trims[position]
        mask, _ = apply_threshold_mask(
            tau.float().reshape(-1), state.threshold, state.ties_before, ties=params.trim_ties
        )
        return tau * mask.reshape(tau.shape)
    if density >= 1.0:
        return tau
    if params.trim_scope == "model":
        raise ValueError(
            "trim_scope 'model' needs thresholds computed over the whole model; "
            "run it through the merge runner"
        )
    k = trim_count(density, tau.numel())
    return tau * top_k_magnitude_mask(tau.float(), k, ties=params.trim_ties)


def _task_vector_merge(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
    """mergekit's generalized task arithmetic, in the dtype, with tureen's options."""
    base = inputs.base
    assert base is not None  # _sparsified checked
    return combine_in_dtype(base, _sparsified(inputs, params, ctx), inputs.model_params, params)


_ARITHMETIC: dict[str, Callable[[MergeInputs, Any, TensorContext], torch.Tensor]] = {
    "linear": _linear,
    "slerp": _slerp,
    "task_arithmetic": _task_vector_merge,
    "ties": _task_vector_merge,
    "dare_linear": _task_vector_merge,
    "dare_ties": _task_vector_merge,
    "della": della_in_dtype,
    "della_linear": della_in_dtype,
    "breadcrumbs": breadcrumbs_in_dtype,
    "breadcrumbs_ties": breadcrumbs_in_dtype,
    "sce": sce_in_dtype,
}
_ARITHMETIC.update(GEOMETRIC_ARITHMETIC)  # model_stock, ram, nuslerp, karcher, ...
