"""GPTAQ: GPTQ with asymmetric calibration (Li et al., 2025, "GPTAQ"/"GPTQv2").

In sequential quantization a layer's inputs come from the already-quantized model (``x~``, here
``x_quant``) while the full-precision model feeds the same layer ``x`` (``x_float``). GPTQ
minimises ``sum_i g_i ||(W - W_hat) x~_i||^2``; GPTAQ matches the full-precision *output* from the
quantized input::

    min_W_hat  sum_i g_i ||W x_i - W_hat x~_i||^2

With ``H~ = 2/sum g * sum_i g_i x~_i x~_i^T`` (exactly GPTQ's Hessian on the quantized inputs) and
the cross term ``C = 2/sum g * sum_i g_i (x_i - x~_i) x~_i^T`` [K, K] this is, up to a constant,
``||(W* - W_hat) X~||^2`` with the target::

    W* = W (X X~^T)(X~ X~^T)^-1 = W + W C H~^-1

So GPTAQ = GPTQ's unchanged solver run on ``W*`` with ``H~``. (The paper folds the ``W C H^-1``
correction into GPTQ's column loop; computing ``W*`` once with the damped ``H~`` and then running
GPTQ is the same objective, just simpler to read.)

**alpha.** What runs is ``W* = W + alpha W C H~^-1`` with ``alpha = QuantConfig.asym_alpha``, 0.25 by
default, as in the authors' code (``fasterquant(..., alpha=0.25)``, "scale it by alpha due to collection
of dXXT and H"); alpha 1 is the exact least-squares target above, alpha 0 is GPTQ. The exact target
over-fits the calibration tokens: on SmolLM2-135M W4 (64 sampled calibration sequences) alpha 1 gave
perplexity 1354 against FP 22.2, GPTQ 30.8, alpha 0.5 30.4 and alpha 0.25 27.7 (the best of all methods
there). The first token carries massive activations (~2400 in a few channels), its float-vs-quantized
input differences are huge, and the least-squares correction chases them with large weight changes that
ruin every other token. See benchmarks/lm_quality.md.

Details:

* ``H~`` is accumulated by :meth:`WeightCalibrator.add_batch` itself (same running normalisation,
  same sqrt(g) token weighting), so with ``x_float == x_quant`` (or :meth:`add_batch` alone) the
  codes, scales, error and damp are bit-identical to :class:`GPTQCalibrator`. ``C`` uses the same
  normalisation; it is only allocated once some ``x_float`` differs from its ``x_quant``.
* Damping: ``W*`` uses ``(H~ + damp * mean(diag H~) * I)^-1`` via a Cholesky solve, with GPTQ's
  rule (dead inputs' diagonal set to 1 first, damp raised x10 on failure, at most
  ``MAX_DAMP_STEPS`` times, then ``NumericalError``). The GPTQ pass escalates on its own (its
  criterion is slightly stricter); should it end on a larger damp, ``W*`` is recomputed with that
  damp and GPTQ rerun, so ``damp_used`` is the one damp both steps used.
* ``error`` is GPTAQ's own objective on the calibration data,
  ``sum_i g_i ||W x_i - W_hat x~_i||^2 / sum_i g_i``: with ``dW = W - W_hat``, ``d_i = x_i - x~_i``::

      error = 1/2 tr(dW H~ dW^T) + tr(W C dW^T) + sum_i g_i ||W d_i||^2 / sum_i g_i

  The last term does not depend on ``W_hat`` and is accumulated as a float64 scalar while the
  data arrives (so ``weight`` must not change between ``add_pair`` and ``solve``, as for every
  calibrator). Note it is *not* GPTQ's ``error`` (``||(W - W_hat) X~||^2``): the two compare
  only when the float and quantized inputs coincide.
"""
from __future__ import annotations

import torch

from ..errors import NumericalError
from .base import QuantResult
from .gptq import MAX_DAMP_STEPS, GPTQCalibrator, damped_cholesky, live_hessian


class GPTAQCalibrator(GPTQCalibrator):
    needs_float_inputs = True  # the sequential runner feeds add_pair(x_quant, x_float, g)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.C: torch.Tensor | None = None  # 2/sum g * sum g (x_f - x_q) x_q^T; None = all zero
        self._const_sum = 0.0  # sum_i g_i ||W (x_f,i - x_q,i)||^2, float64, not normalised

    # ------------------------------------------------------------------------- accumulation
    def add_batch(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Quantized-model inputs only: the float model is taken to see the same (= GPTQ)."""
        self.add_pair(x, x, token_weight)

    def add_pair(
        self, x_quant: torch.Tensor, x_float: torch.Tensor, token_weight: torch.Tensor | None = None
    ) -> None:
        """Accumulate one batch: ``x_quant`` [..., K] from the quantized model, ``x_float`` the same
        tokens' inputs from the full-precision model (same shape), ``token_weight`` as in
        :meth:`WeightCalibrator.add_batch`.
        """
        if tuple(x_float.shape) != tuple(x_quant.shape):
            raise ValueError(
                f"layer {self.name!r}: x_float {tuple(x_float.shape)} and x_quant "
                f"{tuple(x_quant.shape)} must have the same shape (the same tokens)"
            )
        if x_quant.shape[-1] != self.columns:
            raise ValueError(
                f"layer {self.name!r}: input last dim {x_quant.shape[-1]} != in_features {self.columns}"
            )
        # Validate everything before touching any state, so a bad batch leaves H~ and C consistent.
        g = self._token_weights(x_quant.shape[:-1], token_weight)
        xq = x_quant.detach().to(device=self.device, dtype=torch.float32).reshape(-1, self.columns)
        if not torch.isfinite(xq).all():
            raise NumericalError(f"layer {self.name!r}: calibration inputs contain NaN or Inf")
        same = x_float is x_quant
        if not same:
            xf = x_float.detach().to(device=self.device, dtype=torch.float32).reshape(-1, self.columns)
            if not torch.isfinite(xf).all():
                raise NumericalError(f"layer {self.name!r}: full-precision inputs contain NaN or Inf")
        batch_sum = float(g.double().sum())
        if batch_sum == 0.0:
            return  # nothing to add (as in add_batch)

        old_sum = self.weight_sum
        super().add_batch(x_quant, token_weight)  # H~ exactly as GPTQ builds it
        ratio = old_sum / self.weight_sum
        if self.C is not None:
            self.C *= ratio  # running normalisation, as H
        if same:
            return
        d = xf - xq
        if not d.any():
            return  # x_float == x_quant: the cross term and the constant stay zero
        sg = g.sqrt().unsqueeze(1)
        ds = d * sg
        xs = (2.0 / self.weight_sum) ** 0.5 * (xq * sg)
        if self.C is None:
            self.C = torch.zeros(self.columns, self.columns, device=self.device, dtype=torch.float32)
        self.C += ((2.0 / self.weight_sum) ** 0.5 * ds).t() @ xs  # sum_i g_i d_i x~_i^T
        Wd = ds @ self._weight_float().t()  # rows sqrt(g_i) W d_i   [T, N]
        self._const_sum += float(Wd.double().pow(2).sum())

    # ------------------------------------------------------------------------- solve
    def solve(self) -> QuantResult:
        H = self._require_data()
        W = self._weight_float()
        if self.C is None:  # float inputs never differed: W* = W, this is GPTQ
            result = super().solve()
        else:
            Hfix = live_hessian(H)[0]  # GPTQ's treatment of dead inputs, so the damping matches
            W_star, damp = self._target(W, Hfix, self.config.damp, MAX_DAMP_STEPS)
            result = self._gptq_on(W_star)
            if result.damp_used != damp:  # GPTQ needed more damping: use the same for W*
                W_star, damp = self._target(W, Hfix, result.damp_used, 0)
                result = self._gptq_on(W_star)
                if result.damp_used != damp:  # cannot happen: GPTQ's damping ignores the weight
                    raise NumericalError(f"layer {self.name!r}: GPTAQ damping did not settle")
        result.error = self._objective(W, result)
        return result

    def target_weight(self, damp: float | None = None) -> torch.Tensor:
        """``W* = W + alpha W C (H~ + damp * mean(diag H~) I)^-1`` [N, K] float32 (alpha = config.asym_alpha;
        config damp by default, escalated like GPTQ's if the Cholesky fails)."""
        H = live_hessian(self._require_data())[0]
        damp = self.config.damp if damp is None else damp
        return self._target(self._weight_float(), H, damp, MAX_DAMP_STEPS)[0]

    def _target(self, W: torch.Tensor, H: torch.Tensor, damp: float, steps: int) -> tuple[torch.Tensor, float]:
        """``(W*, damp used)``: Cholesky solve with GPTQ's damping rule, ``steps`` escalations."""
        if self.C is None or self.config.asym_alpha == 0.0:
            return W, damp
        WC_t = (W @ self.C).t() * self.config.asym_alpha  # [K, N]

        def shifted(L: torch.Tensor) -> torch.Tensor | None:
            shift = torch.cholesky_solve(WC_t, L).t()  # alpha W C Hd^-1 (Hd symmetric)
            return W + shift if torch.isfinite(shift).all() else None

        return damped_cholesky(H, damp, steps, shifted, f"layer {self.name!r}: GPTAQ target")

    def _gptq_on(self, W_star: torch.Tensor) -> QuantResult:
        """GPTQ's unchanged solver with ``W*`` in place of the layer weight."""
        weight = self.weight
        self.weight = W_star
        try:
            return super().solve()
        finally:
            self.weight = weight

    def _objective(self, W: torch.Tensor, result: QuantResult) -> float:
        """``sum_i g_i ||W x_i - W_hat x~_i||^2 / sum_i g_i`` (see the module docstring)."""
        err = self._error(W, result)  # 1/2 tr(dW H~ dW^T): GPTQ's error
        if self.C is None:
            return err
        dW = (W - result.dequantize()).double()
        cross = float(((W.double() @ self.C.double()) * dW).sum())  # tr(W C dW^T)
        return err + cross + self._const_sum / self.weight_sum

    def free(self) -> None:
        super().free()
        self.C = None
