"""Small examples worked by hand for every method and option."""

from __future__ import annotations

import math

import torch

from merge_kernels.methods.kernel import TensorContext
from merge_kernels.methods.steps import elect_sign, magnitude_trim
from merge_kernels.registry import get_method


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


BASE = t(0, 0, 0, 0)
TAUS = [t(0.5, -0.2, 0.1, 0.0), t(-0.4, 0.3, 0.2, -0.1), t(0.3, -0.1, -0.6, 0.2)]


def merge(
    method: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None = BASE,
    params=None,
    model_params=None,
    reference="peft",
    context=None,
):  # type: ignore[no-untyped-def]
    return get_method(method).merge_tensors(
        models,
        base=base,
        params=params,
        model_params=model_params,
        reference=reference,
        context=context,
    )


def test_uniform_and_weighted_soup() -> None:
    a, b = t(1, 2, 3), t(3, 6, 9)
    assert torch.allclose(merge("linear", [a, b], base=None), t(2, 4, 6))
    weighted = merge("linear", [a, b], base=None, model_params=[{"weight": 3}, {"weight": 1}])
    assert torch.allclose(weighted, t(1.5, 3, 4.5))
    unnormalized = merge(
        "linear",
        [a, b],
        base=None,
        params={"normalize": False},
        model_params=[{"weight": 3}, {"weight": 1}],
    )
    assert torch.allclose(unnormalized, t(6, 12, 18))


def test_task_arithmetic_with_lambda_and_normalize() -> None:
    base = t(1, 1)
    models = [t(2, 1), t(1, 3)]  # τ = (1, 0), (0, 2)
    weights = [{"weight": 1.0}, {"weight": 0.5}]
    assert torch.allclose(
        merge("task_arithmetic", models, base=base, model_params=weights), t(2, 2)
    )
    scaled = merge(
        "task_arithmetic", models, base=base, params={"lambda": 0.5}, model_params=weights
    )
    assert torch.allclose(scaled, t(1.5, 1.5))
    normalized = merge(
        "task_arithmetic", models, base=base, params={"normalize": True}, model_params=weights
    )
    assert torch.allclose(normalized, t(1 + 1 / 1.5, 1 + 1 / 1.5))


def test_ties_trim_elect_and_disjoint_mean() -> None:
    # trim to 2 of 4: τ1 → (.5, -.2, 0, 0), τ2 → (-.4, .3, 0, 0), τ3 → (.3, 0, -.6, 0)
    # vote (total): (.4, .1, -.6, 0) → γ = (+, +, −, + since a zero vote counts as +1)
    # agreeing: e0 {.5, .3} → .4; e1 {.3} → .3; e2 {−.6} → −.6; e3 none → 0
    out = merge("ties", [BASE + tau for tau in TAUS], model_params=[{"density": 0.5}] * 3)
    assert torch.allclose(out, t(0.4, 0.3, -0.6, 0.0))


def test_ties_frequency_election_differs_from_total() -> None:
    models = [t(0.1), t(0.1), t(-0.5)]
    # total: .1 + .1 − .5 < 0 → γ = −, only −.5 agrees
    total = merge("ties", models, base=t(0), model_params=[{"density": 1.0}] * 3)
    assert torch.allclose(total, t(-0.5))
    # frequency: +1 +1 −1 > 0 → γ = +, mean of .1 and .1
    freq = merge(
        "ties",
        models,
        base=t(0),
        params={"majority_sign_method": "frequency"},
        model_params=[{"density": 1.0}] * 3,
    )
    assert torch.allclose(freq, t(0.1))


def test_ties_zero_vote_takes_plus_one_by_default_and_majority_in_paper_mode() -> None:
    # entry 0: votes cancel (.2 − .2 = 0); entries 1 and 2 vote negative.
    models = [t(0.2, -0.3, -0.1), t(-0.2, -0.1, -0.4)]
    peft = merge("ties", models, base=t(0, 0, 0), model_params=[{"density": 1.0}] * 2)
    assert torch.allclose(peft, t(0.2, -0.2, -0.25))
    paper = merge(
        "ties",
        models,
        base=t(0, 0, 0),
        params={"zero_sign": "majority"},
        model_params=[{"density": 1.0}] * 2,
    )
    # Σγ over the tensor is −2, so the zero vote becomes −: entry 0 keeps −.2
    assert torch.allclose(paper, t(-0.2, -0.2, -0.25))


def test_ties_weighted_election_and_weight_sum_divisor_follow_mergekit() -> None:
    models = [t(0.3), t(-0.2)]
    weights = [{"weight": 1.0, "density": 1.0}, {"weight": 2.0, "density": 1.0}]
    # PEFT: vote on τ: .3 − .2 > 0 → +; only model 0 agrees → 1·.3 / 1
    assert torch.allclose(merge("ties", models, base=t(0), model_params=weights), t(0.3))
    # mergekit: vote on w·τ: .3 − .4 < 0 → −; only model 1 agrees → 2·(−.2) / 2
    mk = merge("ties", models, base=t(0), model_params=weights, reference="mergekit")
    assert torch.allclose(mk, t(-0.2))
    # mergekit with normalize false: no division
    raw = merge(
        "ties",
        models,
        base=t(0),
        model_params=weights,
        reference="mergekit",
        params={"normalize": False},
    )
    assert torch.allclose(raw, t(-0.4))


def test_trim_tie_rules_at_the_threshold() -> None:
    tau = t(0.3, -0.3, 0.3, 0.1)
    # k = 2: three entries tie at .3; exact_k keeps the two with the lowest index
    assert torch.equal(magnitude_trim(tau, 0.5), t(0.3, -0.3, 0.0, 0.0))
    assert torch.equal(magnitude_trim(tau, 0.5, ties="threshold"), t(0.3, -0.3, 0.3, 0.0))


def test_elect_sign_options() -> None:
    votes = [t(0.1, 0.0, -0.2), t(0.1, 0.0, 0.1), t(-0.5, 0.0, 0.0)]
    assert torch.equal(elect_sign(votes), t(-1, 1, -1))
    assert torch.equal(elect_sign(votes, method="frequency"), t(1, 1, 1))
    # majority: Σγ = (−1 + 0 − 1) < 0, so the zero vote becomes −1
    assert torch.equal(elect_sign(votes, zero_sign="majority"), t(-1, -1, -1))


def test_dare_linear_rescales_kept_entries_by_inverse_density() -> None:
    tau = torch.full((10_000,), 0.25)
    out = merge("dare_linear", [tau], base=torch.zeros(10_000), model_params=[{"density": 0.25}])
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1.0))
    assert 0.2 < kept.numel() / 10_000 < 0.3


def test_dare_l1_rescale_restores_the_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    tau = torch.randn(4096, generator=generator)
    out = merge(
        "dare_linear",
        [tau],
        base=torch.zeros(4096),
        model_params=[{"density": 0.3}],
        reference="mergekit",
    )
    assert math.isclose(float(out.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)
    no_rescale = merge(
        "dare_linear",
        [tau],
        base=torch.zeros(4096),
        model_params=[{"density": 0.3}],
        params={"rescale": False},
    )
    kept = no_rescale != 0
    assert torch.equal(no_rescale[kept], tau[kept])


def test_dare_ties_elects_on_dropped_vectors() -> None:
    models = [t(0.4, -0.2), t(-0.1, -0.2)]
    out = merge("dare_ties", models, base=t(0, 0), model_params=[{"density": 1.0}] * 2)
    assert torch.allclose(out, t(0.4, -0.2))


def test_slerp_endpoints_midpoint_and_colinear_fallback() -> None:
    a, b = t(1, 0), t(0, 1)
    assert torch.allclose(merge("slerp", [b], base=a, params={"t": 0.0}), a)
    assert torch.allclose(merge("slerp", [b], base=a, params={"t": 1.0}), b, atol=1e-7)
    mid = merge("slerp", [b], base=a, params={"t": 0.5})
    assert torch.allclose(mid, t(math.sqrt(0.5), math.sqrt(0.5)))
    # nearly colinear: plain linear interpolation
    c = t(2, 0.0001)
    assert torch.allclose(merge("slerp", [c], base=a, params={"t": 0.25}), 0.75 * a + 0.25 * c)


def test_dare_mask_depends_on_seed_model_and_tensor_name() -> None:
    tau = torch.ones(4096)
    base = torch.zeros(4096)

    def drop(seed: int, index: int, name: str) -> torch.Tensor:
        return merge(
            "dare_linear",
            [tau],
            base=base,
            model_params=[{"density": 0.5}],
            context=TensorContext(name=name, seed=seed, model_indices=(index,)),
        )

    reference = drop(0, 0, "w")
    assert torch.equal(reference, drop(0, 0, "w"))
    assert not torch.equal(reference, drop(1, 0, "w"))
    assert not torch.equal(reference, drop(0, 1, "w"))
    assert not torch.equal(reference, drop(0, 0, "v"))


def test_unset_density_keeps_every_entry_under_every_reference() -> None:
    # mergekit's default density is 1: nothing is trimmed or dropped.
    for method in ("ties", "dare_ties", "dare_linear"):
        for reference in ("peft", "mergekit", "paper"):
            # the paper's TIES trims per model, which only the runner can: trim per tensor
            params = {"trim_scope": "tensor"} if (method, reference) == ("ties", "paper") else {}
            merged = merge(
                method, [t(1.0), t(-3.0)], base=t(0.0), params=params, reference=reference
            )
            kept = merge(
                method,
                [t(1.0), t(-3.0)],
                base=t(0.0),
                params=params,
                model_params=[{"density": 1.0}, {"density": 1.0}],
                reference=reference,
            )
            assert torch.equal(merged, kept), (method, reference)
