"""Laplace-LoRA (Yang et al., 2024): post-hoc KFAC Laplace over a trained LoRA adapter.

Why post-hoc: the LoRA weights ``θ*`` from ordinary fine-tuning are taken as the MAP; the
posterior ``N(θ*, P⁻¹)`` only needs the curvature of the training loss at ``θ*``, and the
predictive is the linearised (GLM) model ``f(x) + J(x)(θ − θ*)`` whose logits are Gaussian
with mean ``f(x)`` and covariance ``J P⁻¹ Jᵀ``.

Approximations (see also :mod:`kfac` and :mod:`posterior`):

* Curvature = generalised Gauss-Newton of the softmax cross-entropy over the C option logits.
  ``ggn="exact"`` (default): one backward pass per option with ``v_c = √p_c (e_c − p)``, the
  columns of a square root of the softmax Hessian ``diag(p) − ppᵀ``; so ``Σ_c v_c v_cᵀ`` is that
  Hessian exactly. ``ggn="mc"``: ``mc_samples`` passes with ``v = p − e_y``, ``y ~ p``
  (unbiased, cheaper when C is large).
* Block-diagonal over layers; each block ``(N/T)·A ⊗ G`` (KFAC; ``T`` = temperature); a
  ``G`` wider than ``g_dense_limit`` on its support is a rank-``g_rank`` sketch (:mod:`kfac`)
  plus, with ``g_residual="diag"`` (default), the exact diagonal of what the sketch drops
  (:mod:`posterior`); ``"none"`` gives the dropped directions the prior's precision.
  Token positions share a LoRA weight; ``kfac_type="expand"`` (default) treats every real
  (non-padding) position's input and output gradient as a sample (cross-position terms
  dropped), ``"reduce"`` pools positions per example first. Both are exact for one position
  (e.g. ``lm_head`` with ``logits_to_keep=1``) and one example.
* Prior ``N(0, δ⁻¹ I)`` on all LoRA weights; ``δ`` chosen by the Laplace evidence
  ``log p(D|θ*)/T − δ/2‖θ*‖² + (P/2) log δ − ½ log det P`` (the ``2π`` terms cancel) over a grid.
* Closed-form predictive (``n_samples=0``): probit approximation (MacKay),
  ``softmax(μ_c / √(1 + π/8 · Σ_cc))``; Monte-Carlo otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from blob_lora.methods.laplace.kfac import (
    DENSE_LIMIT,
    G_RANK,
    KFAC_TYPES,
    KronAccumulator,
    LayerCapture,
    as_positions,
    augment_input,
    has_trainable_bias,
    layer_dims,
    position_mask,
    trainable_linears,
)
from blob_lora.methods.laplace.posterior import FIELDS, OPTIONAL_FIELDS, KronLayer
from blob_lora.utils.errors import CheckpointError, ConfigError, DamagedFileError, DataError

LogitsFn = Callable[[nn.Module, dict], Tensor]
DEFAULT_GRID = tuple(float(x) for x in torch.logspace(-6, 6, 121, dtype=torch.float64))
_GGN_TYPES = ("exact", "mc")
#: what a sketched ``G`` keeps beyond its leading eigenpairs (:mod:`posterior`)
G_RESIDUALS = ("diag", "none")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while measuring curvature/Jacobians; restore each module's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


def _merge_groups(groups: dict[str, str] | None, batch_reps: dict[str, str]) -> dict[str, str]:
    """Keep ``layer -> representative`` only where every batch so far agreed: then the two
    input factors received identical sums and can share one eigendecomposition."""
    if groups is None:
        return dict(batch_reps)
    return {n: (r if batch_reps.get(n, n) == r else n) for n, r in groups.items()}


def _without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _masked(logits: Tensor) -> Tensor:
    """Excluded options: entries the logits_fn set to -inf."""
    return torch.isneginf(logits)


def _option_pairs(mean: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, C, C)``: 1 where both options are real, 0 where either is masked."""
    keep = (~_masked(mean)).to(dtype)
    return keep[:, :, None] * keep[:, None, :]


def sampled_softmax(
    mean: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """``(S, B, C)`` softmax of ``n_samples`` logit vectors drawn from ``N(mean, cov)``; masked
    options (``mean = -inf``) stay masked."""
    masked = _masked(mean)
    vals, vecs = torch.linalg.eigh(cov.double())
    root = vecs * vals.clamp_min(0.0).sqrt()[:, None, :]  # (B, C, C), root rootᵀ = cov
    z = torch.randn((n_samples, *mean.shape), generator=generator, dtype=torch.float64).to(
        mean.device
    )
    noise = torch.einsum("bck,sbk->sbc", root, z).to(mean.dtype)
    logits = torch.where(masked, mean, mean.masked_fill(masked, 0.0) + noise)
    return torch.softmax(logits, dim=-1)


def probit_softmax(mean: Tensor, cov: Tensor) -> Tensor:
    """``(B, C)`` probit approximation of the softmax of ``N(mean, cov)`` logits (MacKay):
    ``softmax(μ_c / √(1 + π/8 · Σ_cc))``; masked options (``mean = -inf``) stay at 0."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0)
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


class LaplaceLoRA:
    """KFAC Laplace approximation over the trainable ``nn.Linear`` weights of ``model``.

    ``logits_fn(model, batch)`` must return ``(B, C)`` option logits, ``-inf`` for options an
    example does not have; it receives the batch without its ``"labels"`` key.
    ``head_mask_fn(batch)``, if given, returns the ``(B, P)`` mask of the real positions among
    the P a layer sees when it sees fewer than the attention mask's (the output head under a
    per-row gather; :func:`kfac.position_mask`), or None. The model's
    trainable parameters must all be ``nn.Linear`` weights (or biases), e.g. a PEFT LoRA model.
    A layer whose output gradients reach more than ``g_dense_limit`` coordinates (the head's
    vocabulary under cloze scoring) keeps its ``G`` as a rank-``g_rank`` sketch
    (:mod:`kfac`); ``g_sketch_kept`` then says, per such layer, how much of ``G``'s trace the
    sketch kept, and ``g_residual`` what stands for the rest: ``"diag"`` its exact diagonal,
    ``"none"`` nothing (the prior's precision).
    """

    def __init__(
        self,
        model: nn.Module,
        logits_fn: LogitsFn,
        *,
        prior_precision: float = 1.0,
        temperature: float = 1.0,
        kfac_type: str = "expand",
        ggn: str = "exact",
        mc_samples: int = 1,
        max_rank: int | None = None,
        factor_dtype: torch.dtype = torch.float64,
        seed: int = 0,
        head_mask_fn: Callable[[dict], Tensor | None] | None = None,
        g_dense_limit: int = DENSE_LIMIT,
        g_rank: int = G_RANK,
        g_residual: str = "diag",
    ):
        if prior_precision <= 0 or temperature <= 0:
            raise ConfigError("prior_precision and temperature must be positive")
        if kfac_type not in KFAC_TYPES:
            raise ConfigError(f"kfac_type must be one of {KFAC_TYPES}, got {kfac_type!r}")
        if ggn not in _GGN_TYPES:
            raise ConfigError(f"ggn must be one of {_GGN_TYPES}, got {ggn!r}")
        if mc_samples < 1 or (max_rank is not None and max_rank < 1):
            raise ConfigError("mc_samples and max_rank must be at least 1")
        if g_dense_limit < 1 or g_rank < 1:
            raise ConfigError("g_dense_limit and g_rank must be at least 1")
        if g_residual not in G_RESIDUALS:
            raise ConfigError(f"g_residual must be one of {G_RESIDUALS}, got {g_residual!r}")
        self.model = model
        self.logits_fn = logits_fn
        self.prior_precision = float(prior_precision)
        self.temperature = float(temperature)
        self.kfac_type = kfac_type
        self.ggn = ggn
        self.mc_samples = mc_samples
        self.max_rank = max_rank
        self.factor_dtype = factor_dtype
        self.seed = seed
        self.head_mask_fn = head_mask_fn
        self.g_dense_limit = g_dense_limit
        self.g_rank = g_rank
        self.g_residual = g_residual
        self.modules = trainable_linears(model)
        self.layers: dict[str, KronLayer] = {}
        #: per layer whose G was sketched (kfac.py), the share of G's trace the sketch kept
        self.g_sketch_kept: dict[str, float] = {}
        #: per sketched layer, the bound on ‖G − G_sketch‖₂ (G per example; fit only)
        self.g_sketch_norm_dropped: dict[str, float] = {}
        self.n_data = 0
        self.log_likelihood = 0.0  # Σ_n log p(y_n | x_n, θ*), temperature not applied
        self.map_sq_norm = self._map_sq_norm()

    # ---------------------------------------------------------------- fitting

    def _map_sq_norm(self) -> float:
        total = 0.0
        for m in self.modules.values():
            total += float(m.weight.detach().double().pow(2).sum())
            if m.bias is not None and m.bias.requires_grad:
                total += float(m.bias.detach().double().pow(2).sum())
        return total

    @property
    def n_params(self) -> int:
        return sum(a * b for a, b in (layer_dims(m) for m in self.modules.values()))

    def _ggn_vectors(self, logits: Tensor, gen: torch.Generator) -> list[Tensor]:
        """Vectors ``v`` with ``Σ v vᵀ`` = (an estimate of) the softmax Hessian per example."""
        p = torch.softmax(logits.detach().to(self.factor_dtype), dim=-1)
        n_opt = p.shape[1]
        if self.ggn == "exact":
            eye = torch.eye(n_opt, dtype=p.dtype, device=p.device)
            return [
                p[:, c : c + 1].sqrt() * (eye[c] - p)
                for c in range(n_opt)
                if bool((p[:, c] > 0).any())
            ]
        out = []
        for _ in range(self.mc_samples):
            y = torch.multinomial(p.cpu(), 1, generator=gen).flatten().to(p.device)
            onehot = torch.nn.functional.one_hot(y, n_opt).to(p.dtype)
            out.append((p - onehot) / math.sqrt(self.mc_samples))
        return out

    def fit(self, batches: Iterable[dict]) -> None:
        """Accumulate KFAC factors and the MAP log-likelihood over ``batches``; replaces any
        previous fit. Each batch needs ``"labels"``: ``(B,)`` long indices into the C options."""
        accs = {
            n: KronAccumulator(
                *layer_dims(m),
                self.kfac_type,
                self.factor_dtype,
                dense_limit=self.g_dense_limit,
                g_rank=self.g_rank,
            )
            for n, m in self.modules.items()
        }
        capture = LayerCapture(self.modules)
        gen = torch.Generator().manual_seed(self.seed)
        n_data, loglik = 0, 0.0
        groups: dict[str, str] | None = None
        with _eval_mode(self.model), torch.enable_grad():
            for batch in batches:
                if "labels" not in batch:
                    raise DataError("Laplace fit batches need a 'labels' entry")
                with capture.active():
                    logits = self.logits_fn(self.model, _without_labels(batch))
                labels = batch["labels"].to(logits.device).long()
                bsz = self._check_logits(logits, labels.shape[0])
                logp = torch.log_softmax(logits.detach().double(), dim=-1)
                picked = logp.gather(1, labels[:, None])
                if not bool(torch.isfinite(picked).all()):
                    raise DataError("a label points at a masked (-inf) option")
                loglik += float(picked.sum())
                n_data += bsz
                groups = _merge_groups(groups, self._add_inputs(capture, accs, batch, bsz))
                per_vector = [
                    capture.output_grads(logits, v.to(logits.dtype))
                    for v in self._ggn_vectors(logits, gen)
                ]
                for name in per_vector[0] if per_vector else ():
                    gs = [as_positions(grads[name], bsz, name) for grads in per_vector]
                    accs[name].add_output_grad_set(gs)
                del per_vector
                capture.clear()
                del logits
        if n_data == 0:
            raise DataError("Laplace fit got no examples")
        self.n_data, self.log_likelihood = n_data, loglik
        reps = groups or {}
        layers: dict[str, KronLayer] = {}
        for name in sorted(accs, key=lambda n: reps.get(n, n) != n):  # representatives first
            rep = reps.get(name, name)
            shared = None if rep == name else layers[rep].a_eig
            layers[name] = KronLayer.from_accumulator(
                accs[name], n_data, self.max_rank, shared, g_residual=self.g_residual == "diag"
            )
        self.layers = {n: layers[n] for n in accs}
        self.g_sketch_kept = {n: a.g_kept for n, a in accs.items() if a.g_kept is not None}
        self.g_sketch_norm_dropped = {
            n: a.g_norm_dropped / n_data for n, a in accs.items() if a.g_sketch is not None
        }
        self.map_sq_norm = self._map_sq_norm()

    def g_sketch_curvature_lost(self, prior_precision: float | None = None) -> dict[str, float]:
        """Per layer whose ``G`` was sketched: a bound on the curvature any one direction of
        its posterior precision lost to the sketch, over the prior precision,
        ``(N/T)·‖G − G_sketch‖₂·λ_A,max / δ``.

        Why: the sketch keeps the largest directions of ``G`` and gives the rest the prior's
        precision ``δ``. Well below 1, every dropped direction would have had a precision within
        that fraction of ``δ`` anyway, so a larger rank would not move the predictive; near or
        above 1, some would have been tighter than the prior, and the posterior is wider along
        them than a full ``G`` would make it. Computed from the fit alone (``‖·‖₂`` bounded by
        the sum of the largest eigenvalue each compression dropped). With a residual diagonal
        (``g_residual="diag"``) the dropped part's diagonal is kept, so the bound overstates
        what is lost: only the dropped part's off-diagonal is."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else float(prior_precision)
        lost = {}
        for name, dropped in self.g_sketch_norm_dropped.items():
            a_vals = self.layers[name].a_vals
            a_max = float(a_vals.max()) if a_vals.numel() else 0.0
            lost[name] = self._scale * dropped * a_max / delta
        return lost

    def _add_inputs(
        self, capture: LayerCapture, accs: dict[str, KronAccumulator], batch: dict, bsz: int
    ) -> dict[str, str]:
        """Add this batch's input moments; layers fed the very same tensor (LoRA's q_proj and
        v_proj lora_A both see the attention input) share one computation. Returns each layer's
        representative: the first layer that saw its input tensor."""
        mask = batch.get("attention_mask")
        head_mask = self.head_mask_fn(batch) if self.head_mask_fn is not None else None
        seen: dict[tuple, str] = {}
        moments: dict[str, tuple[Tensor, float]] = {}
        reps: dict[str, str] = {}
        for name, raw in capture.inputs.items():
            module = self.modules[name]
            key = (
                raw.data_ptr(),
                tuple(raw.shape),
                raw.stride(),
                raw.dtype,
                has_trainable_bias(module),
            )
            rep = reps[name] = seen.setdefault(key, name)
            if rep == name:
                a = augment_input(as_positions(raw, bsz, name), module)
                valid = position_mask(mask, bsz, a.shape[1], head_mask)
                moments[name] = accs[name].input_moment(a, valid)
            accs[name].add_input_moment(moments[rep])
        return reps

    @staticmethod
    def _check_logits(logits: Tensor, batch_size: int) -> int:
        if logits.dim() != 2 or logits.shape[0] != batch_size:
            raise ConfigError(
                f"logits_fn must return (B, C) option logits; got {tuple(logits.shape)} "
                f"for a batch of {batch_size}"
            )
        if bool(_masked(logits).all(1).any()):
            raise DataError("an example has all options masked")
        return batch_size

    def _require_fit(self) -> None:
        if not self.layers:
            raise ConfigError("call fit() (or load_state_dict()) before using the posterior")

    # ---------------------------------------------------------------- evidence

    @property
    def _scale(self) -> float:
        return self.n_data / self.temperature

    def log_det_posterior_precision(self, prior_precision: float | None = None) -> float:
        """``log det P`` including the closed-form ``log δ`` term of zero-curvature directions."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else float(prior_precision)
        return sum(layer.log_det_precision(self._scale, delta) for layer in self.layers.values())

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """Laplace evidence ``log p(D|θ*)/T + log N(θ*; 0, δ⁻¹I) + (P/2) log 2π − ½ log det P``."""
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else float(prior_precision)
        if delta <= 0:
            raise ConfigError("prior precision must be positive")
        log_prior = -0.5 * delta * self.map_sq_norm + 0.5 * self.n_params * math.log(delta)
        return (
            self.log_likelihood / self.temperature
            + log_prior
            - 0.5 * self.log_det_posterior_precision(delta)
        )

    def optimize_prior_precision(self, grid: Sequence[float] | None = None) -> float:
        """Set the prior precision to the argmax of the evidence over ``grid`` (default
        ``10^-6 … 10^6``, 121 log-spaced points) and return it.

        The evidence is concave in ``log δ`` (``-½ Σ_j log(1 + μ_j/δ) − δ‖θ*‖²/2`` plus
        constants, ``μ_j`` the curvature's eigenvalues, whatever the approximation of it), so
        on a sorted grid the first maximum is found by bisection on the sign of neighbouring
        differences: ~2·log₂(grid) evidences instead of all of them. Why: with a residual
        diagonal one evidence of the vocabulary-wide head costs seconds (:mod:`posterior`).
        An unsorted grid is scanned whole."""
        self._require_fit()
        values = list(DEFAULT_GRID if grid is None else grid)
        if not values or any(v <= 0 for v in values):
            raise ConfigError("the prior-precision grid needs positive values")
        scores: dict[int, float] = {}

        def score(i: int) -> float:
            if i not in scores:
                scores[i] = self.log_marginal_likelihood(values[i])
            return scores[i]

        if all(a < b for a, b in zip(values, values[1:], strict=False)):
            lo, hi = 0, len(values) - 1  # the first i with score(i) >= score(i + 1) is in here
            while lo < hi:
                mid = (lo + hi) // 2
                if score(mid) >= score(mid + 1):
                    hi = mid
                else:
                    lo = mid + 1
            best = lo
        else:
            best = max(range(len(values)), key=score)
        if len(values) > 2 and best in (0, len(values) - 1):
            warnings.warn(
                f"best prior precision {values[best]:g} is at the edge of the grid",
                stacklevel=2,
            )
        self.prior_precision = float(values[best])
        return self.prior_precision

    # ---------------------------------------------------------------- predictive

    def predictive_logit_moments(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Mean ``(B, C)`` and covariance ``(B, C, C)`` of the linearised logits.

        ``J`` comes from C backward passes (one per option) to the LoRA layer outputs. Masked
        options keep mean ``-inf`` and get zero rows/columns in the covariance.
        """
        mean, split = self._logit_cov_split(batch)
        cov = torch.zeros(*mean.shape, mean.shape[1], dtype=self.factor_dtype, device=mean.device)
        for kept, outside in split.values():
            cov += kept if outside is None else kept + outside
        return mean, (cov * _option_pairs(mean, cov.dtype)).to(mean.dtype)

    def logit_cov_by_layer(self, batch: dict) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """The linearised logits' mean ``(B, C)`` and, per layer, its share of their
        covariance split as :meth:`KronLayer.logit_cov_parts` does: ``(kept, outside)``, each
        ``(B, C, C)`` (zeros where no Jacobian leaves the kept subspace; masked options' rows
        and columns zero). The shares sum to :meth:`predictive_logit_moments`' covariance."""
        mean, split = self._logit_cov_split(batch)
        by_layer = {}
        for name, (kept, outside) in split.items():
            pair = _option_pairs(mean, kept.dtype)
            out = torch.zeros_like(kept) if outside is None else outside
            by_layer[name] = ((kept * pair).to(mean.dtype), (out * pair).to(mean.dtype))
        return mean, by_layer

    def _logit_cov_split(
        self, batch: dict
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor | None]]]:
        """The logits' mean and each layer's :meth:`KronLayer.logit_cov_parts` (unmasked)."""
        self._require_fit()
        capture = LayerCapture(self.modules)
        with _eval_mode(self.model), torch.enable_grad(), capture.active():
            logits = self.logits_fn(self.model, _without_labels(batch))
            bsz = self._check_logits(logits, logits.shape[0])
            n_opt = logits.shape[1]
            eye = torch.eye(n_opt, dtype=logits.dtype, device=logits.device)
            inputs = {
                name: augment_input(as_positions(a, bsz, name), self.modules[name])
                for name, a in capture.inputs.items()
                if name in self.layers
            }
            parts: dict[str, list] = {name: [] for name in inputs}
            for c in range(n_opt):
                grads = capture.output_grads(logits, eye[c].expand(bsz, n_opt).contiguous())
                for name, a in inputs.items():
                    g = grads.get(name)
                    g = torch.zeros_like(capture.outputs[name]) if g is None else g
                    parts[name].append(self.layers[name].project(a, as_positions(g, bsz, name)))
                del grads
            split = {  # layers this forward did not use: J = 0
                name: self.layers[name].logit_cov_parts(
                    layer_parts, self._scale, self.prior_precision
                )
                for name, layer_parts in parts.items()
            }
        return logits.detach(), split

    def predictive(
        self, batch: dict, n_samples: int = 0, generator: torch.Generator | None = None
    ) -> Tensor:
        """``(B, C)`` predictive probabilities: probit approximation if ``n_samples == 0``,
        else the mean softmax over ``n_samples`` Gaussian logit samples."""
        if n_samples > 0:
            return self.predictive_samples(batch, n_samples, generator).mean(0)
        return probit_softmax(*self.predictive_logit_moments(batch))

    def predictive_samples(
        self, batch: dict, n_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """``(S, B, C)`` softmax of logits sampled from the linearised predictive."""
        if n_samples < 1:
            raise ConfigError("n_samples must be at least 1")
        mean, cov = self.predictive_logit_moments(batch)
        return sampled_softmax(mean, cov, n_samples, generator)

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Factors (eigen form) and scalars as tensors; ``safetensors.torch.save_file``-able."""
        self._require_fit()
        sd: dict[str, Tensor] = {
            "meta.prior_precision": torch.tensor(self.prior_precision, dtype=torch.float64),
            "meta.temperature": torch.tensor(self.temperature, dtype=torch.float64),
            "meta.n_data": torch.tensor(self.n_data, dtype=torch.long),
            "meta.log_likelihood": torch.tensor(self.log_likelihood, dtype=torch.float64),
            "meta.map_sq_norm": torch.tensor(self.map_sq_norm, dtype=torch.float64),
        }
        for name, layer in self.layers.items():
            for key, t in layer.to_tensors().items():
                sd[f"layers.{name}.{key}"] = t.cpu()
        return sd

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Restore a fit made on a model with the same trainable layers."""
        try:
            prior_precision = float(sd["meta.prior_precision"])
            temperature = float(sd["meta.temperature"])
            n_data = int(sd["meta.n_data"])
            log_likelihood = float(sd["meta.log_likelihood"])
            map_sq_norm = float(sd["meta.map_sq_norm"])
        except KeyError as exc:
            raise DamagedFileError(f"Laplace state is missing {exc}") from exc
        for name, value in (("prior_precision", prior_precision), ("temperature", temperature)):
            if not (math.isfinite(value) and value > 0):  # a negative one gave metrics
                raise DamagedFileError(f"Laplace state's {name} must be > 0, got {value}")
        if n_data < 1:
            raise DamagedFileError(f"Laplace state's n_data must be >= 1, got {n_data}")
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, t in sd.items():
            if key.startswith("layers."):
                name, field = key[len("layers.") :].rsplit(".", 1)
                grouped.setdefault(name, {})[field] = t
        if set(grouped) != set(self.modules):
            missing = sorted(set(self.modules) - set(grouped))[:3]
            extra = sorted(set(grouped) - set(self.modules))[:3]
            raise CheckpointError(
                f"Laplace state does not fit the model (missing {missing}, unexpected {extra})"
            )
        layers = {}
        for name, fields in grouped.items():
            if not set(FIELDS) <= set(fields) <= set(FIELDS) | set(OPTIONAL_FIELDS):
                raise DamagedFileError(f"Laplace state for {name!r} is incomplete")
            try:
                layer = KronLayer.from_tensors(fields)
            except (ValueError, RuntimeError) as exc:
                raise DamagedFileError(f"Laplace state for {name!r}: {exc}") from exc
            if (layer.in_dim, layer.out_dim) != layer_dims(self.modules[name]):
                raise CheckpointError(f"Laplace state for {name!r} has other dimensions")
            layers[name] = layer
        # only a state that passed every check replaces the fit this object holds
        self.prior_precision, self.temperature, self.n_data = prior_precision, temperature, n_data
        self.log_likelihood, self.map_sq_norm = log_likelihood, map_sq_norm
        self.layers = layers
