"""Every method on CUDA tensors gives the CPU's result (DARE's masks bit for bit).

Marked ``gpu``; skipped where CUDA is absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.methods.random_mask import keep_mask
from merge_kernels.registry import get_method, methods

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({"lambda": 0.7}, {"weight": 1.0}),
    "ties": ({}, {"density": 0.2}),
    "dare_linear": ({}, {"density": 0.3}),
    "dare_ties": ({}, {"density": 0.3}),
    "slerp": ({"t": 0.3}, {}),
    "greedy_soup": ({}, {}),
    "iso_c": ({"scaling_factor": 0.7}, {}),
    "iso_cts": ({"common_space_fraction": 0.8}, {}),
    "breadcrumbs": ({}, {"density": 0.3, "gamma": 0.05}),
    "breadcrumbs_ties": ({}, {"density": 0.3, "gamma": 0.05}),
    "della": ({}, {"density": 0.3}),
    "della_linear": ({"rescale_method": "l1"}, {"density": 0.3}),
    "sce": ({"select_topk": 0.3}, {}),
    "model_stock": ({"filter_wise": True}, {}),
    "ram": ({"epsilon": 0.005}, {}),
    "ramplus_tl": ({"epsilon": 0.005}, {}),
    "passthrough": ({}, {"scale": 0.5}),
    "nuslerp": ({"nuslerp_flatten": False}, {"weight": 1.0}),
    "karcher": ({}, {}),
    "multislerp": ({}, {"weight": 1.0}),
    "nearswap": ({"t": 0.005}, {}),
    "arcee_fusion": ({}, {}),
    "tsv_merge": ({"alpha": 0.8}, {"weight": 1.0}),
    # Adam moves an entry by about ±lr a step, its sign a rounding apart where the gradient
    # vanishes: a small lr keeps such flips inside the tolerance.
    "wudi": ({"iter_num": 5, "lr": 1e-7}, {}),
    "consensus": ({"use_ties": True, "lambda": 0.9}, {}),
}


def _run(name: str, device: str, tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    spec = get_method(name)
    params, per_model = PARAMS[name]
    models = tensors[: spec.max_models]
    return spec.merge_tensors(
        [t.to(device) for t in models],
        base=base.to(device) if spec.takes_base else None,
        params=params,
        model_params=[per_model] * len(models),
        context=TensorContext(name="model.layers.3.mlp.up_proj.weight", seed=11),
    ).cpu()


# Methods built on SVDs. In float32, LAPACK and cuSOLVER give singular vectors of a random
# matrix that differ by about 1e-4 where a rank cut falls between nearly equal singular
# values (measured on an H200), which says nothing of the method; in float64 both devices
# must agree far closer (1e-8), which shows the same steps run on each.
SPECTRAL = {"tsv_merge", "iso_c", "iso_cts"}


def _run_float64(
    name: str, device: str, tensors: list[torch.Tensor], base: torch.Tensor
) -> torch.Tensor:
    spec = get_method(name)
    params, per_model = PARAMS[name]
    inputs = MergeInputs(
        base=base.to(device, torch.float64),
        models=[t.to(device, torch.float64) for t in tensors],
        model_params=[spec.model_params.model_validate(per_model) for _ in tensors],
    )
    context = TensorContext(name="model.layers.3.mlp.up_proj.weight", seed=11)
    return spec.kernel(inputs, spec.params.model_validate(params), context).cpu()


@pytest.mark.parametrize("name", sorted(spec.name for spec in methods()))
def test_cuda_matches_cpu(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(512, 1024, generator=generator)
    tensors = [base + 0.01 * torch.randn(512, 1024, generator=generator) for _ in range(3)]
    if name in SPECTRAL:
        cpu = _run_float64(name, "cpu", tensors, base)
        cuda = _run_float64(name, "cuda", tensors, base)
        assert cpu.dtype == torch.float64
        assert torch.allclose(cpu, cuda, atol=1e-8, rtol=1e-7)
        return
    cpu = _run(name, "cpu", tensors, base)
    cuda = _run(name, "cuda", tensors, base)
    assert torch.allclose(cpu, cuda, atol=1e-6, rtol=1e-5)


def test_dare_masks_are_bit_identical_on_cuda() -> None:
    for offset in (0, 12345):
        cpu = keep_mask(987654321, 0.37, 1 << 20, offset=offset, device="cpu")
        cuda = keep_mask(987654321, 0.37, 1 << 20, offset=offset, device="cuda").cpu()
        assert torch.equal(cpu, cuda)
