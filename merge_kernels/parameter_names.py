"""Which recipe parameters a method uses, which it ignores, and which no method knows.

mergekit (0.1.5, ``parameter_resolver.resolve_parameters``) resolves only the parameters a
method declares and silently ignores every other name, and it never reads the per-model
parameters of the base model of a task-vector method. Published configs rely on this:
``density`` given to ``linear``, ``int8_mask`` to ``task_arithmetic``, weights on the base.
tureen accepts such a parameter with a warning (an error under ``strict: true``) and still
refuses a name that no method knows, which is almost always a typo, suggesting the closest
known name. The known names are read from the registry at call time, so a newly registered
method's parameters are known at once, plus mergekit's own parameter vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from merge_kernels.errors import RecipeError
from merge_kernels.registry import MethodSpec, methods
from merge_kernels.suggestions import did_you_mean

if TYPE_CHECKING:
    from merge_kernels.recipe import Recipe

# Every parameter name of mergekit 0.1.5's registered methods (``registered_methods()``).
MERGEKIT_PARAMETERS = frozenset(
    {
        "alpha",
        "density",
        "eps",
        "epsilon",
        "filter_wise",
        "gamma",
        "int8_mask",
        "lambda",
        "max_iter",
        "normalize",
        "normalize_weights",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "r",
        "rescale",
        "scale",
        "select_topk",
        "t",
        "tol",
        "weight",
    }
)


def known_parameter_names() -> set[str]:
    """Every parameter name some registered method or mergekit knows."""
    names = set(MERGEKIT_PARAMETERS)
    for spec in methods():
        names |= spec.method_param_names() | spec.model_param_names()
    return names


class RecipeWarnings:
    """Collects what a recipe gets away with; under ``strict`` each becomes an error.

    Args:
        strict: the recipe's ``strict`` key.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        """Record a warning about ``field``.

        Raises:
            RecipeError: the recipe is strict.
        """
        if self.strict:
            raise RecipeError(field, f"{message} (strict: true makes this an error)")
        self.items.append(f"{field}: {message}")


def _listed(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def check_parameter_names(recipe: Recipe, spec: MethodSpec, warnings: RecipeWarnings) -> None:
    """Refuse unknown parameter names; warn about known ones ``spec`` does not use.

    Raises:
        RecipeError: a name no method knows (with a "did you mean"), or any unused name
            when the recipe is strict.
    """
    method_names = spec.method_param_names()
    model_names = spec.model_param_names()
    used = method_names | model_names
    known = known_parameter_names()

    def refuse_unknown(field: str, name: str, allowed: set[str]) -> None:
        if name in used or name in known:
            return
        hint = did_you_mean(name, allowed) or did_you_mean(name, known)
        raise RecipeError(
            field,
            f"unknown parameter {name!r}: no merge method takes it (mergekit ignores it "
            f"silently; remove it or correct it); {hint}{spec.name} takes: {_listed(allowed)}",
        )

    def unused(name: str) -> str:
        return f"{spec.name} does not use {name!r}; it is ignored, as mergekit ignores it"

    for field, params in (
        ("parameters", recipe.parameters),
        ("slices[0].parameters", recipe.slice_parameters),
    ):
        for name in params or {}:
            refuse_unknown(f"{field}.{name}", name, used)
            if name not in used:
                warnings.add(f"{field}.{name}", unused(name))
    merged = {index for index, _ in recipe.merged_models()}
    for index, entry in enumerate(recipe.models or []):
        params = entry.parameters or {}
        for name in params:
            refuse_unknown(f"models[{index}].parameters.{name}", name, model_names)
        if not params:
            continue
        if index not in merged:
            warnings.add(
                f"models[{index}].parameters",
                f"models[{index}] is the base_model, which {spec.name} does not merge as an "
                f"input: its parameters ({_listed(params)}) are not used",
            )
            continue
        for name in params:
            field = f"models[{index}].parameters.{name}"
            if name in method_names and name not in model_names:
                warnings.add(
                    field,
                    f"{name} applies to the whole merge and is not read per model (mergekit "
                    "ignores it there too); move it to the top-level parameters",
                )
            elif name not in model_names:
                warnings.add(field, unused(name))


def check_assumed_density(recipe: Recipe, spec: MethodSpec, warnings: RecipeWarnings) -> None:
    """Warn for each merged model whose ``density`` no level of the recipe sets.

    mergekit defaults ``density`` to 1 (every entry kept); tureen assumes the same rather
    than refusing, but says so, since a TIES or DARE merge that keeps everything is rarely
    what was meant.

    Raises:
        RecipeError: a density is assumed and the recipe is strict.
    """
    if "density" not in spec.model_param_names():
        return
    default = spec.defaults(recipe.reference).get("density")
    if default not in (None, 1, 1.0):
        return  # the method or reference has a real default of its own
    shared = [recipe.parameters or {}, recipe.slice_parameters or {}]
    missing = [
        f"models[{index}]"
        for index, entry in recipe.merged_models()
        if not any("density" in params for params in [entry.parameters or {}, *shared])
    ]
    if missing:
        warnings.add(
            "parameters.density",
            f"not given for {', '.join(missing)}: assumed 1, mergekit's default (every "
            f"task-vector entry is kept, so {spec.name} drops nothing); set density (the TIES "
            "paper uses 0.2, DARE 0.1 to 0.3) to sparsify",
        )
