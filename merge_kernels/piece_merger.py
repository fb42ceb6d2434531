"""Merging one piece of work: a tensor or a row chunk of it, read from every input.

Soups, task arithmetic, TIES and DARE run, on the CPU, as fused loops over the inputs in their
stored dtype (:mod:`merge_kernels.fused`). Otherwise the inputs are
converted to float32 (into buffers reused from piece to piece), the kernel gets its context
(tensor name, seed, model indices, chunk offset, trim thresholds) and the result is cast
once to the output dtype. A recipe that computes in its dtype (``compute_dtype: dtype``) has
its inputs converted to that dtype instead and merged with mergekit's arithmetic
(:mod:`merge_kernels.methods.compute_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merge_kernels.errors import NonFiniteOutputError, RecipeError
from merge_kernels.finite_check import (
    is_finite,
    non_finite_input_error,
    non_finite_output_error,
)
from merge_kernels.fused import handles, ties_into, trim_thresholds, weighted_sum_into
from merge_kernels.fused_dare import dare_into
from merge_kernels.io.dtypes import torch_dtype
from merge_kernels.io.reader import set_pinned_reads
from merge_kernels.methods.compute_dtype import compute_dtype, computes_in_dtype, merge_in_dtype
from merge_kernels.methods.kernel import MergeInputs, TensorContext, TrimState
from merge_kernels.methods.magnitude_select import (
    NaNMagnitudeError,
    TieRule,
    magnitude_threshold_with_ties,
)
from merge_kernels.methods.steps import trim_count
from merge_kernels.methods.task_arithmetic import TiesParams
from merge_kernels.pieces import Piece, PieceKey, pieces_of
from merge_kernels.plan import MergePlan, TensorPlan
from merge_kernels.trim_prepass import stream_trim_states

_BLOCK = 1 << 18  # entries per block: each input's float32 block (1 MiB) stays in cache


class PieceMerger:
    """Runs the method's kernel on one piece, with the trim thresholds it needs."""

    def __init__(self, plan: MergePlan, device: str, check_cancel: Callable[[], None]):
        self.plan = plan
        self.device = torch.device(device)
        set_pinned_reads(self.device.type == "cuda")
        self.check_cancel = check_cancel
        self.trims: dict[PieceKey, tuple[TrimState, ...]] = {}
        self._buffers: list[torch.Tensor] = []
        # Output buffers of the fused loop, used in turn: a piece's result is still being
        # written while the next one is computed, never longer (see compute).
        self._outputs: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        self._turn = 0

    def prepare_model_trims(self) -> None:
        """Compute the model-wide thresholds, if the recipe trims per model."""
        scope = [t for t in self.plan.tensors if t.trim == "model_prepass"]
        # no models besides the base: nothing to trim
        if not scope or not any(t.params is not None and t.params.models for t in scope):
            return
        try:
            self.trims.update(self._stream(scope))
        except NaNMagnitudeError:
            raise NonFiniteOutputError(
                "an input holds NaN in a tensor that the model-wide trim ranks by magnitude, "
                "where NaN has no order: fix or replace that checkpoint (trim_scope: tensor "
                "names the tensor)",
                details={"tensor": None},
            ) from None

    def _stream(self, tensors: list[TensorPlan]) -> dict[PieceKey, tuple[TrimState, ...]]:
        first = tensors[0].params
        assert first is not None
        densities = [getattr(p, "density", None) or 1.0 for p in first.models]
        ties: TieRule = (
            first.method.trim_ties if isinstance(first.method, TiesParams) else "exact_k"
        )
        pieces = [piece for tensor in tensors for piece in pieces_of(tensor)]
        return stream_trim_states(self.plan, pieces, densities, ties, self.check_cancel)

    def compute(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor:
        """The merged piece, in the output dtype, on the CPU.

        The result may live in a buffer that the piece after next reuses: write it (or copy
        it) before computing two more pieces.

        Raises:
            NonFiniteOutputError: the piece holds NaN or infinities and the recipe does not
                set ``allow_non_finite``.
        """
        positions = unit.tensor.inputs or tuple(range(len(self.plan.inputs)))
        names = [self.plan.inputs[p].checkpoint.display_name for p in positions]
        rows = (unit.start, unit.stop) if unit.start is not None and unit.stop is not None else None
        try:
            merged = self._merge(unit, raw)
        except NaNMagnitudeError:
            raise non_finite_input_error(
                unit.tensor.name, list(zip(names, raw, strict=True)), rows
            ) from None
        checked = unit.tensor.params is not None and not self.plan.recipe.allow_non_finite
        if checked and not is_finite(merged):
            raise non_finite_output_error(
                unit.tensor.name,
                unit.tensor.dtype,
                merged,
                list(zip(names, raw, strict=True)),
                rows,
            )
        return merged

    def _merge(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor:
        tensor = unit.tensor
        if tensor.params is None:
            return raw[0]
        if not tensor.params.models:  # the base alone (Recipe.base_only), as mergekit writes it
            return raw[0].to(torch_dtype(tensor.dtype))
        spec = self.plan.recipe.method
        if computes_in_dtype(self.plan.recipe):
            return self._compute_in_dtype(unit, raw)
        if self.device.type == "cpu" and spec.weighted_form is not None:
            fused = self._compute_fused(unit, raw)
            if fused is not None:
                return fused
        if self.device.type == "cpu" and spec.consensus_form is not None:
            fused = self._compute_fused_ties(unit, raw)
            if fused is not None:
                return fused
        if self.device.type == "cpu" and spec.dare_form is not None:
            fused = self._compute_fused_dare(unit, raw)
            if fused is not None:
                return fused
        if (
            self.device.type == "cpu"
            and spec.cache_blocking
            and spec.chunkable(tensor.params.method)
        ):
            return self._compute_in_blocks(unit, raw)
        return self._compute_whole(unit, raw)

    def _compute_fused(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor | None:
        tensor = unit.tensor
        spec = self.plan.recipe.method
        assert tensor.params is not None and spec.weighted_form is not None
        form = spec.weighted_form(tensor.params.method, tensor.params.models)
        out = self._output(unit, raw[0].shape)
        base = raw[0] if tensor.has_base else None
        models = raw[1:] if tensor.has_base else raw
        return out if weighted_sum_into(out, models, form, base) else None

    def _compute_fused_ties(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor | None:
        tensor = unit.tensor
        spec = self.plan.recipe.method
        assert tensor.params is not None and spec.consensus_form is not None
        form = spec.consensus_form(tensor.params.method)
        if form is None or not tensor.has_base:
            return None
        base, models = raw[0], raw[1:]
        if not handles("ties", torch_dtype(tensor.dtype), models, raw):
            return None  # before finding thresholds that the torch path would find again
        trims = self._trims_for(unit)
        cutoffs: list[int | None] | None = None
        if trims is None and tensor.trim == "kernel":
            trims, cutoffs = self._tensor_thresholds(models, base, tensor.params.models)
        if trims is None:
            return None
        weights = [float(getattr(p, "weight", 1.0)) for p in tensor.params.models]
        out = self._output(unit, raw[0].shape)
        merged = ties_into(out, base, models, form, weights, trims, cutoffs)
        return out if merged is not None else None

    def _compute_fused_dare(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor | None:
        tensor = unit.tensor
        spec = self.plan.recipe.method
        assert tensor.params is not None and spec.dare_form is not None
        form = spec.dare_form(tensor.params.method, tensor.params.models)
        if form is None or not tensor.has_base:
            return None
        context = TensorContext(
            name=tensor.name,
            seed=self.plan.recipe.seed,
            model_indices=tensor.model_indices,
            offset=unit.offset,
        )
        out = self._output(unit, raw[0].shape)
        return out if dare_into(out, raw[0], raw[1:], form, context) else None

    @staticmethod
    def _tensor_thresholds(
        models: list[torch.Tensor], base: torch.Tensor, params: tuple[object, ...]
    ) -> tuple[tuple[TrimState, ...], list[int | None]]:
        """Each model's trim threshold over a whole tensor: fused where it can be. With it,
        where known, the index of the last tied entry exact_k keeps (see ``ties_into``)."""
        ks = [trim_count(getattr(p, "density", None) or 1.0, base.numel()) for p in params]
        states: list[TrimState] = []
        cutoffs: list[int | None] = []
        for model, k, found in zip(models, ks, trim_thresholds(models, base, ks), strict=True):
            if found is not None:
                states.append(TrimState(found.threshold, 0))
                cutoffs.append(found.cutoff)
                continue
            tau = torch.sub(model.float(), base.float())
            threshold, tied = magnitude_threshold_with_ties(tau, k)
            states.append(TrimState(threshold, 0))
            cutoffs.append(base.numel() if threshold.keep_at_value == tied else None)
        return tuple(states), cutoffs

    def _output(self, unit: Piece, shape: torch.Size) -> torch.Tensor:
        """The next output buffer in turn, as ``unit``'s output dtype and ``shape`` (grown as
        pieces need)."""
        dtype = torch_dtype(unit.tensor.dtype)
        nbytes = unit.numel * dtype.itemsize
        self._turn = 1 - self._turn
        if self._outputs[self._turn].numel() < nbytes:
            self._outputs[self._turn] = torch.empty(nbytes, dtype=torch.uint8)
        return self._outputs[self._turn][:nbytes].view(dtype).view(shape)

    def _kernel(
        self,
        unit: Piece,
        floats: list[torch.Tensor],
        offset: int,
        trims: tuple[TrimState, ...] | None,
    ) -> torch.Tensor:
        tensor = unit.tensor
        assert tensor.params is not None
        base = floats[0] if tensor.has_base else None
        models = floats[1:] if tensor.has_base else floats
        context = TensorContext(
            name=tensor.name,
            seed=self.plan.recipe.seed,
            model_indices=tensor.model_indices,
            offset=offset,
            trims=trims,
        )
        try:
            return self.plan.recipe.method.kernel(
                MergeInputs(base=base, models=models, model_params=tensor.params.models),
                tensor.params.method,
                context,
            )
        except NaNMagnitudeError:
            raise  # the inputs' fault, not the parameters': see compute
        except ValueError as error:
            raise RecipeError("parameters", f"{error} (tensor {tensor.name})") from None

    def _compute_in_blocks(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor:
        """Run an elementwise kernel block by block, each block small enough for the cache.

        A kernel makes several passes over its inputs; on blocks of a few hundred thousand
        entries those passes hit the CPU cache instead of memory. Trim thresholds (the
        kernel's, or a pre-pass's) are fixed for the whole piece first, and the count of
        tied entries is carried from block to block, so every block trims exactly as the
        whole piece would.
        """
        tensor = unit.tensor
        flats = [piece.reshape(-1) for piece in raw]
        numel = flats[0].numel()
        out = torch.empty(numel, dtype=torch_dtype(tensor.dtype))
        trims = self._trims_for(unit)
        count_ties = trims is not None and any(state.threshold.keep_at_value > 0 for state in trims)
        if tensor.trim == "kernel":
            trims, count_ties = self._piece_thresholds(unit, flats)
        seen = [state.ties_before for state in trims] if trims is not None else []
        offset = unit.offset
        for start in range(0, numel, _BLOCK):
            stop = min(numel, start + _BLOCK)
            floats = [
                self._as_float32(position, flat[start:stop]) for position, flat in enumerate(flats)
            ]
            block_trims = None
            if trims is not None:
                block_trims = tuple(
                    TrimState(state.threshold, before)
                    for state, before in zip(trims, seen, strict=True)
                )
            out[start:stop] = self._kernel(unit, floats, offset + start, block_trims)
            if trims is not None and count_ties:
                for index, state in enumerate(trims):
                    tau = floats[index + 1] - floats[0]
                    seen[index] += int((tau.abs_() == state.threshold.value).sum())
        return out.view(raw[0].shape)

    def _piece_thresholds(
        self, unit: Piece, flats: list[torch.Tensor]
    ) -> tuple[tuple[TrimState, ...], bool]:
        """Each model's exact trim threshold over the whole piece (a tensor trimmed whole),
        and whether some model keeps only part of its tied entries (so blocks must count)."""
        assert unit.tensor.params is not None
        base = flats[0].float()
        states = []
        partial = False
        for flat, params in zip(flats[1:], unit.tensor.params.models, strict=True):
            density = getattr(params, "density", None) or 1.0
            tau = torch.sub(flat.float(), base)
            k = min(tau.numel(), int(density * tau.numel()))
            threshold, tied = magnitude_threshold_with_ties(tau, k)
            partial = partial or 0 < threshold.keep_at_value < tied
            states.append(TrimState(threshold, 0))
        return tuple(states), partial

    def _compute_whole(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor:
        tensor = unit.tensor
        out_dtype = torch_dtype(tensor.dtype)
        floats = [self._as_float32(position, piece) for position, piece in enumerate(raw)]
        merged = self._kernel(unit, floats, unit.offset, self._trims_for(unit)).to(out_dtype)
        if merged.device.type == "cpu":
            return merged
        host = torch.empty(merged.shape, dtype=out_dtype, pin_memory=True)
        return host.copy_(merged)  # into pinned memory: a DMA copy, not a staged one

    def _compute_in_dtype(self, unit: Piece, raw: list[torch.Tensor]) -> torch.Tensor:
        """The piece merged in the recipe's dtype with mergekit's arithmetic (no fused loop:
        those compute in float32)."""
        tensor = unit.tensor
        assert tensor.params is not None
        dtype = compute_dtype(self.plan.recipe, raw)
        inputs = [piece.to(device=self.device, dtype=dtype) for piece in raw]
        base = inputs[0] if tensor.has_base else None
        context = TensorContext(
            name=tensor.name,
            seed=self.plan.recipe.seed,
            model_indices=tensor.model_indices,
            offset=unit.offset,
            trims=self._trims_for(unit),
        )
        spec = self.plan.recipe.method
        try:
            merged = merge_in_dtype(
                spec.name,
                spec.kernel,
                MergeInputs(
                    base=base,
                    models=inputs[1:] if tensor.has_base else inputs,
                    model_params=tensor.params.models,
                ),
                tensor.params.method,
                context,
            )
        except ValueError as error:
            if isinstance(error, NaNMagnitudeError):
                raise
            raise RecipeError("parameters", f"{error} (tensor {tensor.name})") from None
        return merged.to(device="cpu", dtype=torch_dtype(tensor.dtype))

    def _as_float32(self, position: int, piece: torch.Tensor) -> torch.Tensor:
        """``piece`` in float32 on the device, converted into a buffer kept per input.

        Reusing the buffers spares a fresh allocation (and its page faults) per input per
        piece; kernels never modify their inputs, so the views stay valid until the next
        piece.
        """
        if self.device.type != "cpu":
            # Pinned input (see set_pinned_reads): the copy is asynchronous and moves the
            # stored dtype's bytes; the conversion to float32 runs on the device.
            return piece.to(device=self.device, non_blocking=True).to(torch.float32)
        if piece.dtype == torch.float32:
            return piece
        while len(self._buffers) <= position:
            self._buffers.append(torch.empty(0, dtype=torch.float32))
        if self._buffers[position].numel() < piece.numel():
            self._buffers[position] = torch.empty(piece.numel(), dtype=torch.float32)
        view = self._buffers[position][: piece.numel()].view(piece.shape)
        return view.copy_(piece)

    def _trims_for(self, unit: Piece) -> tuple[TrimState, ...] | None:
        if unit.tensor.trim == "tensor_prepass" and unit.key not in self.trims:
            self.trims.update(self._stream([unit.tensor]))
        return self.trims.get(unit.key)
