"""DARE inside the fused CPU loops: the random drop and rescale, then task arithmetic or TIES.

DARE (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv 2311.03099) drops
each task-vector entry with probability 1 − density and divides the survivors by the
density. Through torch that is a float32 copy of every input, a keep mask per model
(:func:`~merge_kernels.methods.random_mask.keep_mask`), a multiply and a divide, then the
weighted sum (``dare_linear``) or TIES' sign election and disjoint mean (``dare_ties``) as
passes of their own. The weighted and TIES loops of :mod:`merge_kernels.fused` run the
drop per entry instead: the keyed hash of the entry's flat index decides whether it is
kept, ``(τ · keep) / density`` is rounded twice as torch rounds it, and the combination
follows in the same pass. The mask is never materialised and the output is bit-identical
to the torch path's (``random_drop`` with ``inverse_density`` or no rescale, then
``linear_combination`` / ``consensus_combination``); tests/merge_kernels/test_fused_dare.py
checks that. The ``l1`` rescale needs whole-tensor norms first and stays on the torch path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_kernels import fused
from merge_kernels.fused import ConsensusForm, WeightedSum
from merge_kernels.methods.kernel import TensorContext
from merge_kernels.methods.random_mask import _threshold as keep_threshold
from merge_kernels.methods.random_mask import dare_key

_MAX_INDEX = 1 << 63  # the keyed hash's flat indices lie below this


@dataclass(frozen=True)
class DareForm:
    """DARE's parameters as the fused loops take them.

    Attributes:
        densities: each model's keep probability, in (0, 1].
        rescale: divide the survivors by their density (``inverse_density``); else keep
            them as they are.
        weights: each model's weight.
        combine: the weighted sum of the dropped task vectors (``dare_linear``: its weights
            are ``weights``) or TIES' election and disjoint mean (``dare_ties``; the trim
            rule is unused: the drop replaces the trim).
    """

    densities: tuple[float, ...]
    rescale: bool
    weights: tuple[float, ...]
    combine: WeightedSum | ConsensusForm


def dare_into(
    out: torch.Tensor,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    form: DareForm,
    ctx: TensorContext,
) -> bool:
    """DARE's merge of ``models`` over ``base`` into ``out``, if the fused loop takes them.

    The keep decisions are those of :func:`~merge_kernels.methods.steps.random_drop` under
    ``ctx``: each model's key from (``ctx.seed``, ``ctx.model_index``, ``ctx.name``), the
    entries' flat indices from ``ctx.offset`` (the piece's first entry in the whole tensor).

    Returns:
        True when ``out`` holds the result; False when the loop does not take the inputs
        (``out`` is untouched and the caller takes the torch path).

    Raises:
        ValueError: as many densities and weights as models are not given.
    """
    extension = fused.extension()
    linear = isinstance(form.combine, WeightedSum)
    inputs = [base, *models]
    if extension is None or not getattr(extension, "DARE_LOOPS", 0):
        return False  # an extension built before its loops took DARE's arguments
    if not fused.handles("weighted" if linear else "ties", out, models, inputs):
        return False
    count = len(models)
    if len(form.densities) != count or len(form.weights) != count:
        raise ValueError(
            f"{len(form.densities)} densities, {len(form.weights)} weights for {count} models"
        )
    numel = out.numel()
    if not numel:
        return True
    if not 0 <= ctx.offset <= _MAX_INDEX - numel:
        return False  # the torch path reports the range
    keys = [dare_key(ctx.seed, ctx.model_index(i), ctx.name) for i in range(count)]
    thresholds = [keep_threshold(d) for d in form.densities]
    divisors = [d if form.rescale else 1.0 for d in form.densities]
    in_code, out_code = fused.dtype_code(base.dtype), fused.dtype_code(out.dtype)
    assert in_code is not None and out_code is not None
    in_size, out_size = base.dtype.itemsize, out.dtype.itemsize
    weights = [float(w) for w in form.weights]
    combine = form.combine

    def run(start: int, stop: int) -> None:
        pointers = [m.data_ptr() + start * in_size for m in models]
        drop = (keys, thresholds, divisors, ctx.offset + start)
        if isinstance(combine, WeightedSum):
            extension.weighted(
                out.data_ptr() + start * out_size,
                out_code,
                pointers,
                in_code,
                weights,
                combine.divisor is not None,
                combine.divisor if combine.divisor is not None else 1.0,
                base.data_ptr() + start * in_size,
                combine.scale,
                stop - start,
                *drop,
            )
            return
        unused = [0] * count  # the trim's thresholds and cutoffs: the drop replaces them
        extension.ties(
            out.data_ptr() + start * out_size,
            out_code,
            pointers,
            base.data_ptr() + start * in_size,
            in_code,
            weights,
            unused,
            unused,
            combine.weighted_election,
            combine.frequency,
            combine.divisor,
            combine.scale,
            stop - start,
            *drop,
        )

    fused.run_all([functools.partial(run, *part) for part in fused.parts(numel)])
    return True
