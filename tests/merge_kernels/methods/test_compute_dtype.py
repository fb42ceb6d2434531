"""The arithmetic of ``compute_dtype: dtype`` against tureen's float32 kernels, with hypothesis.

In float32 the two differ only in the order of operations, so for every option of every
method they must agree to float32 rounding; in bfloat16 the result is the dtype's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from merge_kernels.methods.compute_dtype import merge_in_dtype
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.registry import get_method

finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)
weights = st.floats(0.125, 2.0, allow_nan=False, width=32)

OPTIONS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "linear": st.fixed_dictionaries({"normalize": st.booleans()}),
    "task_arithmetic": st.fixed_dictionaries(
        {"normalize": st.booleans(), "lambda": st.sampled_from([1.0, 0.7])}
    ),
    "ties": st.fixed_dictionaries(
        {
            "weighted_election": st.booleans(),
            "divisor": st.sampled_from(["count", "weight_sum"]),
            "normalize": st.booleans(),
            "majority_sign_method": st.sampled_from(["total", "frequency"]),
            "zero_sign": st.sampled_from(["positive", "majority"]),
            "trim_ties": st.sampled_from(["exact_k", "threshold"]),
            "lambda": st.sampled_from([1.0, 0.7]),
        }
    ),
    "dare_ties": st.fixed_dictionaries(
        {
            "weighted_election": st.booleans(),
            "divisor": st.sampled_from(["count", "weight_sum"]),
            "rescale_method": st.sampled_from(["inverse_density", "l1"]),
            "rescale": st.booleans(),
        }
    ),
    "dare_linear": st.fixed_dictionaries(
        {"rescale_method": st.sampled_from(["inverse_density", "l1"]), "normalize": st.booleans()}
    ),
    "slerp": st.fixed_dictionaries({"t": st.floats(0, 1, width=32)}),
}


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict[str, Any], MergeInputs]:
    method = draw(st.sampled_from(sorted(OPTIONS)))
    spec = get_method(method)
    shape = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    count = 1 if method == "slerp" else draw(st.integers(1, 3))
    one = arrays(np.float32, shape, elements=finite).map(torch.from_numpy)
    models = [draw(one) for _ in range(count)]
    per_model: dict[str, Any] = {} if method == "slerp" else {"weight": draw(weights)}
    if spec.model_params.model_fields.get("density") is not None:
        per_model["density"] = draw(st.sampled_from([0.3, 0.5, 1.0]))
    model_params = [spec.model_params.model_validate(per_model) for _ in models]
    base = draw(one) if spec.needs_base else None
    return method, draw(OPTIONS[method]), MergeInputs(base, models, model_params)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_float32_arithmetic_agrees_with_the_float32_kernels(
    case: tuple[str, dict[str, Any], MergeInputs],
) -> None:
    method, options, inputs = case
    spec = get_method(method)
    params = spec.params.model_validate(options)
    context = TensorContext(name="model.layers.0.w", seed=3)
    expected = spec.kernel(inputs, params, context)
    got = merge_in_dtype(method, spec.kernel, inputs, params, context)
    assert got.dtype == torch.float32
    scale = max(1.0, float(expected.abs().max()))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * scale), (method, options)


def test_bfloat16_inputs_give_a_bfloat16_result_rounded_at_each_step() -> None:
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    model = base + torch.tensor([1e-2, -3e-3, 7e-3], dtype=torch.bfloat16)
    spec = get_method("task_arithmetic")
    params = spec.params.model_validate({"lambda": 0.7})
    model_params = [spec.model_params.model_validate({"weight": 0.3})]
    inputs = MergeInputs(base, [model], model_params)
    got = merge_in_dtype("task_arithmetic", spec.kernel, inputs, params, TensorContext(name="w"))
    assert got.dtype == torch.bfloat16
    tau = model - base
    step = (tau * torch.tensor(0.3, dtype=torch.bfloat16)) * 0.7
    assert torch.equal(got, base + step)
