"""The one registry of merge methods: name -> typed parameters, kernel and paper.

Adding a method means adding one module under ``merge_kernels/methods`` that builds a
:class:`MethodSpec` and calls :func:`register`. Registering a name twice raises, so a
method can never silently replace another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_kernels.errors import RecipeError
from merge_kernels.fused import ConsensusForm, WeightedSum
from merge_kernels.fused_dare import DareForm
from merge_kernels.methods.kernel import (
    MergeInputs,
    MethodParams,
    ModelParams,
    Reference,
    TensorContext,
)
from merge_kernels.suggestions import did_you_mean

Kernel = Callable[[MergeInputs, Any, TensorContext], torch.Tensor]
Check = Callable[[Any, tuple[Any, ...]], None]
WeightedForm = Callable[[Any, tuple[Any, ...]], WeightedSum]
ConsensusFormOf = Callable[[Any], ConsensusForm | None]
WorkingMemory = Callable[[Any, tuple[int, ...], int], int]
DareFormOf = Callable[[Any, tuple[Any, ...]], DareForm | None]


def _no_check(params: Any, model_params: tuple[Any, ...]) -> None:
    return None


def _never_chunk(params: Any) -> bool:
    return False


@dataclass(frozen=True)
class MethodSpec:
    """Everything tureen knows about one merge method.

    Attributes:
        name: the recipe's ``merge_method`` value.
        title: a human name for listings.
        paper: citation of the method's paper (and the reference code it follows).
        params: frozen pydantic model of the parameters for the whole tensor.
        model_params: frozen pydantic model of the per-model parameters.
        kernel: the tensor function.
        needs_base: whether ``base_model`` is required (task-vector methods).
        optional_base: the method works without a base, but a given ``base_model`` is its
            base (θ₀, the origin of task vectors), not one more model to merge (nuslerp,
            multislerp). Without it a method that does not need a base merges a given base
            like any other model.
        min_models: fewest inputs besides the base.
        max_models: most inputs besides the base, or None for no limit.
        references: per reference implementation, the parameter defaults that reproduce it;
            applied under whatever the recipe sets explicitly.
        chunkable: given the resolved parameters, whether output element i depends only on
            input elements i (so a huge tensor may be merged in row chunks).
        row_local: given the resolved parameters, whether each row (index along the first
            axis) of a tensor of two or more axes is merged from the same row of the inputs
            alone (ranks or angles within a row), so such a tensor may be merged in row
            chunks although the method is not elementwise.
        needs_trim_threshold: given the parameters, whether the kernel trims by magnitude
            (so the runner may precompute thresholds for chunked or model-wide trims).
        check: extra validation of one tensor's resolved parameters (raises ValueError).
        needs_evaluation: the method chooses its inputs by scoring candidates (greedy soup),
            so it runs through an evaluation loop, not as a plain merge.
        cache_blocking: the kernel makes many passes over each element (masks, votes,
            counts), so the runner feeds it cache-sized blocks; one- or two-pass kernels
            run faster on whole pieces.
        weighted_form: for a method that is one weighted sum per entry, its parameters as a
            :class:`~merge_kernels.fused.WeightedSum`, so CPU merges can run the fused loop.
        consensus_form: for TIES, its parameters as a :class:`~merge_kernels.fused.ConsensusForm`
            (None for options the fused loop does not cover), for the fused CPU loop.
        dare_form: for DARE, its parameters as a :class:`~merge_kernels.fused_dare.DareForm`
            (None for options the fused loops do not cover), for the fused CPU loops.
        description: one paragraph for ``GET /v1/methods`` and ``tureen methods``.
        working_memory: for a method whose working set is not a few tensors of the input's
            size (SVDs, optimisers), its peak bytes for one tensor: (resolved parameters,
            shape, number of inputs read, base included) -> bytes; the plan's peak estimate
            uses it in place of its elementwise rule.
    """

    name: str
    title: str
    paper: str
    params: type[MethodParams]
    model_params: type[ModelParams]
    kernel: Kernel
    needs_base: bool
    description: str
    min_models: int = 1
    max_models: int | None = None
    optional_base: bool = False
    references: Mapping[Reference, Mapping[str, Any]] = field(default_factory=dict)
    chunkable: Callable[[Any], bool] = _never_chunk
    row_local: Callable[[Any], bool] = _never_chunk
    needs_trim_threshold: Callable[[Any], bool] = _never_chunk
    check: Check = _no_check
    needs_evaluation: bool = False
    cache_blocking: bool = False
    weighted_form: WeightedForm | None = None
    consensus_form: ConsensusFormOf | None = None
    working_memory: WorkingMemory | None = None
    dare_form: DareFormOf | None = None

    @property
    def takes_base(self) -> bool:
        """Whether a given ``base_model`` is the base (θ₀) rather than one more input."""
        return self.needs_base or self.optional_base

    def defaults(self, reference: Reference) -> dict[str, Any]:
        """The parameter defaults under ``reference``: the field defaults, then its preset."""
        values: dict[str, Any] = {}
        for model in (self.params, self.model_params):
            for name, info in model.model_fields.items():
                if not info.is_required():
                    values[info.alias or name] = info.get_default(call_default_factory=True)
        values.update(self.references.get(reference, {}))
        return values

    def merge_tensors(
        self,
        models: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None = None,
        params: Mapping[str, Any] | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
        reference: Reference = "peft",
        context: TensorContext | None = None,
    ) -> torch.Tensor:
        """Merge in-memory tensors with this method: the library entry point for one tensor.

        Args:
            models: the inputs besides the base, all of one shape (any float dtype; the math
                runs in float32 and the result has the base's or first model's dtype).
            base: θ₀, required when ``needs_base``, optional when ``optional_base``.
            params: whole-tensor parameters by recipe name (e.g. ``{"lambda": 0.5}``).
            model_params: per-model parameters by recipe name, one mapping per model.
            reference: whose defaults unset options follow.
            context: tensor name, seed and model indices (for DARE); a default otherwise.

        Returns:
            The merged tensor.

        Raises:
            ValueError: invalid parameters or inputs.
        """
        defaults = self.defaults(reference)
        method_names = self.method_param_names()
        model_names = self.model_param_names()
        method = self.params.model_validate(
            {k: v for k, v in defaults.items() if k in method_names} | dict(params or {})
        )
        per_model = tuple(
            self.model_params.model_validate(
                {k: v for k, v in defaults.items() if k in model_names} | dict(given)
            )
            for given in (model_params or [{}] * len(models))
        )
        self.check(method, per_model)
        dtype = (base if base is not None else models[0]).dtype
        inputs = MergeInputs(
            base=base.float() if base is not None else None,
            models=[m.float() for m in models],
            model_params=per_model,
        )
        result = self.kernel(inputs, method, context or TensorContext(name="tensor"))
        return result.to(dtype)

    def method_param_names(self) -> set[str]:
        """Recipe names (aliases) of the whole-tensor parameters."""
        return {info.alias or name for name, info in self.params.model_fields.items()}

    def model_param_names(self) -> set[str]:
        """Recipe names (aliases) of the per-model parameters."""
        return {info.alias or name for name, info in self.model_params.model_fields.items()}


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry.

    Raises:
        ValueError: a method of that name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``.

    Raises:
        RecipeError: no such method; the message lists the registered names.
    """
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        allowed = ", ".join(sorted(_REGISTRY))
        hint = did_you_mean(str(name), _REGISTRY)
        raise RecipeError(
            "merge_method", f"unknown merge method {name!r}; {hint}allowed: {allowed}"
        ) from None


def methods() -> Iterator[MethodSpec]:
    """Every registered method, by name."""
    _load_builtin_methods()
    for name in sorted(_REGISTRY):
        yield _REGISTRY[name]


def _load_builtin_methods() -> None:
    # Importing the package runs each method module's register() call exactly once.
    import merge_kernels.methods.builtin  # noqa: F401
