"""The experiment's settings and its multi-task merge rows, each with its validation grid.

Each row is one merge method over the four task adapters, with the hyper-parameter chosen on
the validation split from a small grid around the reference default:

* task arithmetic (Ilharco et al., ICLR 2023): λ;
* TIES (Yadav et al., NeurIPS 2023) at the paper's density 0.2: λ;
* DARE-linear and DARE-TIES (Yu et al., ICML 2024): the density, at the λ chosen for task
  arithmetic and TIES respectively (DARE as a pre-processing step of the method it feeds);
* TSV-M (Gargiulo et al., CVPR 2025): ``alpha``, the reference default 1.0 and below it,
  since the merged task vector is of the order of the task vectors' sum (as task
  arithmetic's, whose λ lands below 1 here);
* ISO-C and ISO-CTS (Marczak et al., ICML 2025): ``scaling_factor``, the reference default
  1.0 and above it, since the flat spectrum spreads the sum's few large singular values
  (low-rank LoRA deltas) over every direction of each matrix and so shrinks the task
  directions;
* consensus merging (TALL masks; Wang et al., ICML 2024) over task arithmetic and over TIES,
  at the reference's ``prun_thre_k`` 2 and ``tall_mask_lambda`` 0.6: ``lambda``, which the
  reference too picks on validation; its multi-task vector is a sum (TIES' too, the
  reference's ``dis-sum``), hence a grid down to 0.25;
* WUDI (Cheng et al., ICML 2025), 400 Adam steps per matrix at the reference's lr 1e-5:
  ``scaling_factor``, the reference's 1.0 and below it (it starts from the task vectors'
  sum, as task arithmetic).

TSV-M, ISO, consensus and WUDI are linear in their scale, θ₀ + α·M (M does not depend on
α), so each runs once per seed set at scale 1 and every α of the grid is
θ₀ + α·(merge − θ₀): task arithmetic over that one merge (the same model up to float32
rounding; the smoke test checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quality_tasks import SplitSizes


@dataclass(frozen=True)
class Settings:
    """Sizes and hyper-parameters of one experiment.

    Attributes:
        sizes: records per split of every task.
        steps: optimizer steps per adapter.
        batch_size: examples per step.
        learning_rate: AdamW learning rate of the task adapters (linear decay).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        target_modules: the adapted linear layers.
        max_length: longest tokenized example.
        soup_task: the task trained several times for the soups.
        soup_runs: ``(seed, learning_rate)`` of the soup task's extra runs.
        ta_lambdas: task arithmetic's λ grid.
        ties_density: TIES' density (share of each task vector kept).
        ties_lambdas: TIES' λ grid.
        dare_densities: DARE's density grid.
        tsv_alphas: TSV-M's ``alpha`` grid.
        iso_scales: ISO-C's and ISO-CTS' ``scaling_factor`` grid.
        iso_cts_fraction: ISO-CTS' ``common_space_fraction`` (the reference default).
        consensus_lambdas: consensus merging's ``lambda`` grid (over task arithmetic and TIES).
        wudi_scales: WUDI's ``scaling_factor`` grid.
        wudi_iter_num: WUDI's Adam steps per matrix (the reference's 400).
        skip: rows left out (by name), e.g. WUDI on a CPU.
        eval_batch_size: records per evaluation batch.
        max_new_tokens: generation length for exact match (None: longest answer + 1).
    """

    sizes: SplitSizes
    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    max_length: int
    soup_task: str
    soup_runs: tuple[tuple[int, float], ...]
    ta_lambdas: tuple[float, ...]
    ties_density: float
    ties_lambdas: tuple[float, ...]
    dare_densities: tuple[float, ...]
    tsv_alphas: tuple[float, ...]
    iso_scales: tuple[float, ...]
    iso_cts_fraction: float
    consensus_lambdas: tuple[float, ...]
    wudi_scales: tuple[float, ...]
    wudi_iter_num: int
    eval_batch_size: int
    max_new_tokens: int | None = None
    skip: tuple[str, ...] = ()


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL = Settings(
    sizes=SplitSizes(train=256, validation=32, test=64),
    steps=40,
    batch_size=8,
    learning_rate=1e-3,
    lora_r=8,
    lora_alpha=16.0,
    target_modules=ALL_LINEAR,
    max_length=96,
    soup_task="add",
    soup_runs=((1, 1.5e-3), (2, 7e-4)),
    ta_lambdas=(0.5, 0.75, 1.0),
    ties_density=0.2,
    ties_lambdas=(0.75, 1.0, 1.5),
    dare_densities=(0.5, 0.7),
    tsv_alphas=(0.5, 0.75, 1.0),
    iso_scales=(1.0, 3.0, 10.0, 30.0),
    iso_cts_fraction=0.8,
    consensus_lambdas=(0.25, 0.5, 0.75, 1.0),
    wudi_scales=(0.5, 0.75, 1.0),
    wudi_iter_num=400,
    eval_batch_size=64,
)
QUICK = Settings(
    sizes=SplitSizes(train=16, validation=4, test=4),
    steps=2,
    batch_size=4,
    learning_rate=1e-2,
    lora_r=4,
    lora_alpha=8.0,
    target_modules=("q_proj", "v_proj"),
    max_length=256,
    soup_task="add",
    soup_runs=((1, 2e-2), (2, 5e-3)),
    ta_lambdas=(1.0,),
    ties_density=0.2,
    ties_lambdas=(1.0,),
    dare_densities=(0.5,),
    tsv_alphas=(0.5,),
    iso_scales=(2.0,),
    iso_cts_fraction=0.8,
    consensus_lambdas=(0.5,),
    wudi_scales=(0.5,),
    wudi_iter_num=10,
    eval_batch_size=8,
    max_new_tokens=4,
)


@dataclass(frozen=True)
class MethodRow:
    """One multi-task merge row.

    Attributes:
        name: the row's label.
        method: the engine's method name.
        grid: the settings tried on validation, given the settings chosen so far (DARE
            takes the λ chosen for the method it feeds).
        scale: the parameter the method is linear in, for a spectral method run once at
            scale 1 and rescaled; None for a method merged afresh at every setting.
        fixed: parameters every setting shares.
        seeded: the method draws random masks (seeded with the seed set's seed).
    """

    name: str
    method: str
    grid: Callable[[dict[str, dict[str, Any]]], list[dict[str, float]]]
    scale: str | None = None
    fixed: tuple[tuple[str, Any], ...] = ()
    seeded: bool = False


# Adapters leave the embeddings untouched: their task vectors are zero, which a spectral
# merge (or WUDI) maps to zero either way, so skipping their SVD (49152 × 576) or WUDI's
# 49152 × 49152 products changes no value.
UNTOUCHED = ("embed_tokens", "lm_head")
NO_SVD_FOR_EMBEDDINGS = [*({"filter": f, "value": True} for f in UNTOUCHED), {"value": False}]
SPECTRAL_FOR_MATRICES = [*({"filter": f, "value": False} for f in UNTOUCHED), {"value": True}]


#: Rows the others need: the reference of every comparison, and the λ DARE-linear takes.
REQUIRED = ("TIES", "task arithmetic")


def method_rows(settings: Settings) -> list[MethodRow]:
    """The multi-task merge rows, in the order they run: the reference (TIES) and the newer
    methods first, so that a run stopped early has them; DARE after the λ it takes; WUDI,
    the slowest on a CPU (400 Adam steps per matrix), last."""

    def chosen(selection: dict[str, dict[str, Any]], name: str) -> float:
        return float(selection[name]["chosen"]["lambda"])

    rows = [
        MethodRow(
            "TIES",
            "ties",
            lambda _: [
                {"density": settings.ties_density, "lambda": value}
                for value in settings.ties_lambdas
            ],
        ),
        MethodRow(
            "TSV-M",
            "tsv_merge",
            lambda _: [{"alpha": value} for value in settings.tsv_alphas],
            scale="alpha",
            fixed=(("exclude_from_svd", NO_SVD_FOR_EMBEDDINGS),),
        ),
        MethodRow(
            "ISO-C",
            "iso_c",
            lambda _: [{"scaling_factor": value} for value in settings.iso_scales],
            scale="scaling_factor",
            fixed=(("spectral", SPECTRAL_FOR_MATRICES),),
        ),
        MethodRow(
            "ISO-CTS",
            "iso_cts",
            lambda _: [
                {"common_space_fraction": settings.iso_cts_fraction, "scaling_factor": value}
                for value in settings.iso_scales
            ],
            scale="scaling_factor",
            fixed=(("spectral", SPECTRAL_FOR_MATRICES),),
        ),
        MethodRow(
            "task arithmetic",
            "task_arithmetic",
            lambda _: [{"lambda": value} for value in settings.ta_lambdas],
        ),
        MethodRow(
            "DARE-TIES",
            "dare_ties",
            lambda s: [
                {"density": d, "lambda": chosen(s, "TIES")} for d in settings.dare_densities
            ],
            seeded=True,
        ),
        MethodRow(
            "DARE-linear",
            "dare_linear",
            lambda s: [
                {"density": d, "lambda": chosen(s, "task arithmetic")}
                for d in settings.dare_densities
            ],
            seeded=True,
        ),
        MethodRow(
            "consensus (TA)",
            "consensus",
            lambda _: [{"lambda": value} for value in settings.consensus_lambdas],
            scale="lambda",
        ),
        MethodRow(
            "consensus (TIES)",
            "consensus",
            lambda _: [{"lambda": value} for value in settings.consensus_lambdas],
            scale="lambda",
            fixed=(("use_ties", True),),
        ),
        MethodRow(
            "WUDI",
            "wudi",
            lambda _: [{"scaling_factor": value} for value in settings.wudi_scales],
            scale="scaling_factor",
            fixed=(("optimize", SPECTRAL_FOR_MATRICES), ("iter_num", settings.wudi_iter_num)),
        ),
    ]
    return [row for row in rows if row.name not in settings.skip]
