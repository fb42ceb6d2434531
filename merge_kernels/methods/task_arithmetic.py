"""Task-vector merges: task arithmetic, TIES and DARE, as settings of one kernel.

- Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023
  (arXiv 2212.04089). θ = θ₀ + λ Σ wᵢ τᵢ with τᵢ = θᵢ − θ₀.
- TIES-Merging: Yadav et al., NeurIPS 2023 (arXiv 2306.01708); reference code
  prateeky2806/ties-merging ``ties_minimal.ipynb`` and PEFT ``utils/merge_utils.py``.
  Trim each τᵢ to its top-k magnitudes, elect a sign per entry, average the agreeing entries.
- DARE: Yu et al., "Language Models are Super Mario", ICML 2024 (arXiv 2311.03099).
  Drop each entry of τᵢ with probability 1 − density and rescale the survivors; then
  either task arithmetic (``dare_linear``) or TIES' election and disjoint mean
  (``dare_ties``, as PEFT and mergekit).

Defaults follow PEFT's ``merge_utils``. ``reference: mergekit`` elects signs on the
weighted task vectors, divides by the sum of agreeing weights and rescales DARE by the L1
norm (and the merge computes in the recipe's dtype in mergekit's order of operations:
:mod:`merge_kernels.methods.compute_dtype`); ``reference: paper`` trims one threshold per
model, keeps every entry at the threshold and resolves zero votes by the majority sign.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from merge_kernels.fused import ConsensusForm, WeightedSum
from merge_kernels.fused_dare import DareForm
from merge_kernels.methods.kernel import (
    MergeInputs,
    MethodParams,
    ModelParams,
    TensorContext,
)
from merge_kernels.methods.steps import (
    Divisor,
    Rescale,
    SignMethod,
    TieRule,
    ZeroSign,
    agreement_mask,
    disjoint_mean,
    elect_sign,
    magnitude_trim,
    magnitude_trim_given,
    random_drop,
    task_vector,
    weighted_sum,
)
from merge_kernels.registry import MethodSpec, register


class WeightParams(ModelParams):
    """Per-model parameters of task arithmetic."""

    weight: float = Field(1.0, description="Scale of this model's task vector (wᵢ).")


class SparseModelParams(WeightParams):
    """Per-model parameters of TIES and DARE."""

    density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Fraction of this model's task-vector entries to keep, in (0, 1] (the "
        "TIES paper uses 0.2). Unset: 1, every entry kept (mergekit's default), with a "
        "warning.",
    )


class ScaledParams(MethodParams):
    """The scale shared by every task-vector method."""

    lambda_: float = Field(
        1.0, alias="lambda", description="Scale of the merged task vector before it is added."
    )


class TaskArithmeticParams(ScaledParams):
    """Parameters of task arithmetic."""

    normalize: bool = Field(False, description="Divide Σ wᵢ τᵢ by Σ wᵢ (mergekit's option).")


class ConsensusParams(ScaledParams):
    """Sign election and disjoint-mean options shared by TIES and DARE-TIES."""

    majority_sign_method: SignMethod = Field(
        "total",
        description="`total`: sign of Σ τᵢ (the paper's mass); `frequency`: sign of Σ sign(τᵢ).",
    )
    weighted_election: bool = Field(
        False, description="Elect on wᵢ·τᵢ (mergekit) instead of τᵢ (paper, PEFT)."
    )
    zero_sign: ZeroSign = Field(
        "positive",
        description="Sign where the vote is 0: `positive` (+1, PEFT/mergekit) or `majority` "
        "(the sign of the tensor's elected signs' sum, the paper).",
    )
    normalize: bool = Field(True, description="Divide the sum of agreeing entries (see divisor).")
    divisor: Literal["count", "weight_sum"] = Field(
        "count",
        description="`count`: number of agreeing models (paper, PEFT); `weight_sum`: Σ of "
        "agreeing weights (mergekit).",
    )
    int8_mask: bool = Field(
        False, description="Accepted for mergekit configs; masks are boolean here, so no effect."
    )

    def effective_divisor(self) -> Divisor:
        """The divisor actually applied, with ``normalize`` taken into account."""
        return self.divisor if self.normalize else "none"


class TiesParams(ConsensusParams):
    """Parameters of TIES-Merging."""

    trim_ties: TieRule = Field(
        "exact_k",
        description="At the trim threshold keep exactly k entries, lowest flat index first "
        "(`exact_k`: k as PEFT and mergekit keep, whose topk/argsort leaves which tied "
        "entries unspecified) or every |τ| ≥ threshold (`threshold`, the paper).",
    )
    trim_scope: Literal["tensor", "model"] = Field(
        "tensor",
        description="One threshold per tensor (PEFT, mergekit) or per model over its whole "
        "flattened task vector (the paper; costs a first pass over the inputs).",
    )


class DareRescaleParams(MethodParams):
    """How DARE rescales what survives the drop."""

    rescale: bool = Field(True, description="Rescale the surviving entries after the drop.")
    rescale_method: Literal["inverse_density", "l1"] = Field(
        "inverse_density",
        description="`inverse_density`: divide by density (paper, PEFT); `l1`: restore the "
        "task vector's L1 norm (mergekit).",
    )


class DareLinearParams(TaskArithmeticParams, DareRescaleParams):
    """Parameters of DARE followed by task arithmetic."""


class DareTiesParams(ConsensusParams, DareRescaleParams):
    """Parameters of DARE followed by TIES' sign election and disjoint mean."""


# How one model's task vector is sparsified: (τ, position among the models, density, ctx) -> τ'
Sparsifier = Callable[[torch.Tensor, int, float, TensorContext], torch.Tensor]


def _keep_all(tau: torch.Tensor, position: int, density: float, ctx: TensorContext) -> torch.Tensor:
    return tau


def _magnitude_trimmer(params: TiesParams) -> Sparsifier:
    def trim(tau: torch.Tensor, position: int, density: float, ctx: TensorContext) -> torch.Tensor:
        if ctx.trims is not None:
            state = ctx.trims[position]
            return magnitude_trim_given(
                tau, state.threshold, state.ties_before, ties=params.trim_ties
            )
        if params.trim_scope == "model":
            raise ValueError(
                "trim_scope 'model' needs thresholds computed over the whole model; "
                "run it through the merge runner"
            )
        return magnitude_trim(tau, density, ties=params.trim_ties)

    return trim


def _random_dropper(params: DareRescaleParams) -> Sparsifier:
    rescale: Rescale = params.rescale_method if params.rescale else "none"

    def drop(tau: torch.Tensor, position: int, density: float, ctx: TensorContext) -> torch.Tensor:
        return random_drop(
            tau,
            density,
            seed=ctx.seed,
            model_index=ctx.model_index(position),
            tensor_name=ctx.name,
            offset=ctx.offset,
            rescale=rescale,
        )

    return drop


def sparsified_task_vectors(
    inputs: MergeInputs, ctx: TensorContext, sparsify: Sparsifier
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """The base, each model's (sparsified) task vector, and each model's weight."""
    if inputs.base is None:
        raise ValueError("task-vector methods need the base model's tensor")
    taus = []
    weights = []
    for position, (model, model_params) in enumerate(
        zip(inputs.models, inputs.model_params, strict=True)
    ):
        density = getattr(model_params, "density", None)
        taus.append(sparsify(task_vector(model, inputs.base), position, density or 1.0, ctx))
        weights.append(float(getattr(model_params, "weight", 1.0)))
    return inputs.base, taus, weights


def linear_combination(
    taus: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """Σ wᵢ τᵢ, divided by Σ wᵢ when ``normalize`` (task arithmetic, DARE, DELLA-linear)."""
    merged = weighted_sum(taus, weights)
    if normalize:
        merged.div_(sum(weights))
    return merged


def consensus_combination(
    taus: list[torch.Tensor], weights: list[float], params: ConsensusParams
) -> torch.Tensor:
    """TIES' sign election and disjoint mean of the (sparsified) task vectors."""
    electors = (
        [tau * w for tau, w in zip(taus, weights, strict=True)]
        if params.weighted_election
        else taus
    )
    gamma = elect_sign(electors, method=params.majority_sign_method, zero_sign=params.zero_sign)
    masks = [agreement_mask(elector, gamma) for elector in electors]
    return disjoint_mean(taus, weights, masks, divisor=params.effective_divisor())


def task_arithmetic(
    inputs: MergeInputs, params: TaskArithmeticParams, ctx: TensorContext
) -> torch.Tensor:
    """θ₀ + λ Σ wᵢ τᵢ (divided by Σ wᵢ when ``normalize``)."""
    base, taus, weights = sparsified_task_vectors(inputs, ctx, _keep_all)
    merged = linear_combination(taus, weights, params.normalize)
    return torch.add(base, merged, alpha=params.lambda_)


def ties(inputs: MergeInputs, params: TiesParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + λ · disjoint mean of the trimmed task vectors that agree with the elected sign."""
    base, taus, weights = sparsified_task_vectors(inputs, ctx, _magnitude_trimmer(params))
    merged = consensus_combination(taus, weights, params)
    return torch.add(base, merged, alpha=params.lambda_)


def dare_linear(inputs: MergeInputs, params: DareLinearParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + λ Σ wᵢ drop(τᵢ)."""
    base, taus, weights = sparsified_task_vectors(inputs, ctx, _random_dropper(params))
    merged = linear_combination(taus, weights, params.normalize)
    return torch.add(base, merged, alpha=params.lambda_)


def dare_ties(inputs: MergeInputs, params: DareTiesParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + λ · disjoint mean of the dropped task vectors that agree with the elected sign."""
    base, taus, weights = sparsified_task_vectors(inputs, ctx, _random_dropper(params))
    merged = consensus_combination(taus, weights, params)
    return torch.add(base, merged, alpha=params.lambda_)


def _task_arithmetic_form(
    params: TaskArithmeticParams, models: tuple[WeightParams, ...]
) -> WeightedSum:
    weights = tuple(float(p.weight) for p in models)
    return WeightedSum(weights, sum(weights) if params.normalize else None, params.lambda_)


_DIVISOR_CODES = {"count": 0, "weight_sum": 1, "none": 2}


def _ties_form(params: TiesParams) -> ConsensusForm | None:
    return _consensus_form(params, threshold_rule=params.trim_ties == "threshold")


def _consensus_form(params: ConsensusParams, *, threshold_rule: bool) -> ConsensusForm | None:
    if params.zero_sign != "positive":  # needs the whole tensor's elected signs
        return None
    return ConsensusForm(
        threshold_rule=threshold_rule,
        weighted_election=params.weighted_election,
        frequency=params.majority_sign_method == "frequency",
        divisor=_DIVISOR_CODES[params.effective_divisor()],
        scale=params.lambda_,
    )


def _dare_form(
    params: DareLinearParams | DareTiesParams, models: tuple[SparseModelParams, ...]
) -> DareForm | None:
    if params.rescale and params.rescale_method == "l1":  # needs whole-tensor L1 norms
        return None
    weights = tuple(float(p.weight) for p in models)
    densities = tuple(p.density or 1.0 for p in models)
    combine: WeightedSum | ConsensusForm | None
    if isinstance(params, DareTiesParams):
        combine = _consensus_form(params, threshold_rule=False)  # no trim: rule unused
    else:
        combine = WeightedSum(weights, sum(weights) if params.normalize else None, params.lambda_)
    if combine is None:
        return None
    return DareForm(densities, params.rescale, weights, combine)


def check_normalized_weights(params: MethodParams, model_params: tuple[WeightParams, ...]) -> None:
    """Refuse weights that sum to 0 when the method divides by their sum."""
    if getattr(params, "normalize", False) and sum(p.weight for p in model_params) == 0:
        raise ValueError(
            "weights sum to 0 with normalize: true; change a weight or set normalize: false"
        )


def check_density(params: MethodParams, model_params: tuple[SparseModelParams, ...]) -> None:
    """The per-tensor check of the sparse methods' parameters (normalized weights)."""
    # An unset density means 1 (keep everything), as in mergekit; the recipe warns about it.
    if isinstance(params, TaskArithmeticParams):
        check_normalized_weights(params, model_params)


_MERGEKIT_CONSENSUS = {"weighted_election": True, "divisor": "weight_sum", "density": 1.0}

register(
    MethodSpec(
        name="task_arithmetic",
        title="Task arithmetic",
        paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
        params=TaskArithmeticParams,
        model_params=WeightParams,
        kernel=task_arithmetic,
        needs_base=True,
        description="Adds the weighted sum of task vectors (fine-tune minus base) to the base.",
        chunkable=lambda params: True,
        check=check_normalized_weights,
        weighted_form=_task_arithmetic_form,
    )
)

register(
    MethodSpec(
        name="ties",
        cache_blocking=True,
        title="TIES-Merging",
        paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, "
        "NeurIPS 2023 (arXiv 2306.01708)",
        params=TiesParams,
        model_params=SparseModelParams,
        kernel=ties,
        needs_base=True,
        description="Trims each task vector to its largest-magnitude entries, elects a sign "
        "per entry and averages only the entries that agree with it.",
        references={
            "mergekit": _MERGEKIT_CONSENSUS,
            "paper": {"trim_ties": "threshold", "trim_scope": "model", "zero_sign": "majority"},
        },
        chunkable=lambda params: params.zero_sign == "positive",
        needs_trim_threshold=lambda params: True,
        check=check_density,
        consensus_form=_ties_form,
    )
)

register(
    MethodSpec(
        name="dare_linear",
        cache_blocking=True,
        title="DARE + task arithmetic",
        paper="Yu et al., Language Models are Super Mario: Absorbing Abilities from "
        "Homologous Models as a Free Lunch, ICML 2024 (arXiv 2311.03099)",
        params=DareLinearParams,
        model_params=SparseModelParams,
        kernel=dare_linear,
        needs_base=True,
        description="Randomly drops task-vector entries, rescales the survivors, then adds "
        "their weighted sum to the base.",
        references={"mergekit": {"rescale_method": "l1", "density": 1.0}},
        chunkable=lambda params: not (params.rescale and params.rescale_method == "l1"),
        check=check_density,
        dare_form=_dare_form,
    )
)

register(
    MethodSpec(
        name="dare_ties",
        cache_blocking=True,
        title="DARE + TIES",
        paper="Yu et al., Language Models are Super Mario, ICML 2024 (arXiv 2311.03099); "
        "sign election and disjoint mean from TIES-Merging (arXiv 2306.01708)",
        params=DareTiesParams,
        model_params=SparseModelParams,
        kernel=dare_ties,
        needs_base=True,
        description="Randomly drops task-vector entries and rescales the survivors, then "
        "elects a sign per entry and averages the entries that agree with it.",
        references={
            "mergekit": {**_MERGEKIT_CONSENSUS, "rescale_method": "l1", "normalize": False},
            "paper": {"zero_sign": "majority"},
        },
        chunkable=lambda params: (
            params.zero_sign == "positive"
            and not (params.rescale and params.rescale_method == "l1")
        ),
        check=check_density,
        dare_form=_dare_form,
    )
)
