"""WUDI merging: the merged task vector that least disturbs each task's own inputs.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025 (arXiv 2503.08099); reference code FusionBench
(``tanganke/fusion_bench``, ``fusion_bench/method/wudi/wudi.py::wudi_merging``), whose
optimisation this follows step for step. With task vectors τᵢ = θᵢ − θ₀ of T fine-tunes:

- A 2-D tensor (a linear layer's weight): the rows of τᵢ approximately span the inputs that
  task i feeds the layer, so τᵢ serves as that task's data. Starting from τ = Σ τᵢ, run
  ``iter_num`` steps of Adam (learning rate ``lr``, no weight decay) on

      L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,

  the interference of the merged update with each task's inputs, each task weighted by the
  inverse of its squared norm.
- Any other tensor (biases, norms; and a 2-D tensor with ``optimize: false``, the
  reference's ``exclude_keys``): the task vectors' mean, Σ τᵢ / T.

The merge is θ₀ + ``scaling_factor`` · τ; the reference adds τ as it is (factor 1).

A task vector that is zero for a tensor (a frozen layer) has no inputs to protect; in the
reference its term is 0/0 and turns the whole result into NaN. Here it is left out of the
loss (it still adds its zero to the starting sum), which is what the reference computes
whenever every task vector is non-zero. Where all of them are zero, so is the result.

Working memory: the reference keeps every τᵢ, the T products (τ − τᵢ) τᵢᵀ of size m × m
and their gradients, and Adam's two moments: :func:`wudi_working_bytes` counts them, so a
plan can bound a merge's peak before it starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.single_thread_linalg import one_cpu_thread
from merge_kernels.methods.steps import task_vector
from merge_kernels.registry import MethodSpec, register


class WudiParams(MethodParams):
    """Parameters of WUDI merging (FusionBench's ``wudi.yaml``; ``lr`` is fixed there)."""

    iter_num: int = Field(
        400, ge=0, description="Adam steps per weight matrix (the reference config's 400)."
    )
    lr: float = Field(
        1e-5, gt=0.0, description="Adam's learning rate (the reference's fixed 1e-5)."
    )
    scaling_factor: float = Field(
        1.0, description="Scale of the merged task vector before it is added to the base."
    )
    optimize: bool = Field(
        True,
        description="Optimise this 2-D tensor's merged task vector; false takes the task "
        "vectors' mean instead (the reference's exclude_keys: set it per tensor with a "
        "filtered list). Tensors that are not 2-D always take the mean.",
    )


def interference_loss(
    merged: torch.Tensor, taus: torch.Tensor, squared_norms: torch.Tensor
) -> torch.Tensor:
    """Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F for ``taus`` stacked as (T, m, n), in the reference's ops."""
    disturbing = merged.unsqueeze(0) - taus
    product = torch.matmul(disturbing, taus.transpose(1, 2))
    return torch.sum(torch.square(product) / squared_norms.unsqueeze(-1).unsqueeze(-1))


def wudi_matrix(taus: Sequence[torch.Tensor], iter_num: int, lr: float) -> torch.Tensor:
    """WUDI's merged task matrix: Adam on :func:`interference_loss` from Σ τᵢ.

    Runs with gradients on whatever the caller's grad mode is, and, on the CPU, on one
    thread so its bits do not depend on the machine's thread count.
    """
    with one_cpu_thread(taus[0].device), torch.inference_mode(False), torch.enable_grad():
        stacked = torch.stack(list(taus))  # a new tensor, also outside inference mode
        merged = torch.nn.Parameter(torch.sum(stacked, dim=0))
        squared_norms = torch.square(torch.norm(stacked.reshape(stacked.shape[0], -1), p=2, dim=-1))
        # A zero task vector's term is 0/0 (see the module docstring): leave it out.
        present = squared_norms > 0
        if not bool(present.all()):
            stacked, squared_norms = stacked[present], squared_norms[present]
        if stacked.shape[0] == 0:
            return merged.detach()
        optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
        for _ in range(iter_num):
            loss = interference_loss(merged, stacked, squared_norms)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        return merged.detach()


def task_vector_mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ τᵢ / T, summed over the stacked task vectors as the reference does."""
    return torch.sum(torch.stack(list(taus)), dim=0) / len(taus)


def wudi(inputs: MergeInputs, params: WudiParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + scaling_factor · (WUDI matrix for a 2-D tensor, else the task vectors' mean)."""
    base = inputs.base
    if base is None:
        raise ValueError("wudi needs the base model's tensor")
    taus = [task_vector(model, base) for model in inputs.models]
    if base.dim() == 2 and params.optimize:
        merged = wudi_matrix(taus, params.iter_num, params.lr)
    else:
        merged = task_vector_mean(taus)
    return base + merged * params.scaling_factor


def wudi_working_bytes(params: WudiParams, shape: tuple[int, ...], inputs: int) -> int:
    """Bytes WUDI holds at its peak for one tensor of ``shape`` with ``inputs`` tensors read.

    For an m × n matrix and T task vectors (float32): the task vectors and their stack,
    the disturbance τ − τᵢ, its gradient and the broadcast gradient of τ (T·m·n each, with
    slack for autograd's temporaries: 6·T·m·n in all), the parameter, its gradient, Adam's
    two moments and the output (6·m·n), and the products (τ − τᵢ) τᵢᵀ with their square,
    quotient and gradients (6·T·m·m). Other tensors: the task vectors and their stack.
    """
    count = max(1, inputs - 1)  # every input but the base
    elements = math.prod(shape)
    if len(shape) != 2 or not params.optimize:
        return 4 * elements * (2 * count + 2)
    rows = shape[0]
    return 4 * (elements * (6 * count + 6) + 6 * count * rows * rows)


register(
    MethodSpec(
        name="wudi",
        title="WUDI merging (Whoever Started the Interference Should End It)",
        paper="Cheng et al., Whoever Started the Interference Should End It: Guiding "
        "Data-Free Model Merging via Task Vectors, ICML 2025 (arXiv 2503.08099); "
        "FusionBench's WUDIMerging",
        params=WudiParams,
        model_params=NoModelParams,
        kernel=wudi,
        needs_base=True,
        description="Per weight matrix, starts from the sum of the task vectors and runs "
        "iter_num Adam steps that minimise its interference with each task, the task vectors "
        "standing in for the tasks' inputs; other tensors take the task vectors' mean. The "
        "result, times scaling_factor, is added to the base.",
        working_memory=wudi_working_bytes,
    )
)
