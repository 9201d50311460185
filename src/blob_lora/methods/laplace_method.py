"""Laplace-LoRA in the shared harness (paper baseline): MAP training, then a post-hoc posterior.

Training: an ordinary ``map`` run (LoRA + weight decay, 1e-5 unless ``--weight-decay`` says
otherwise) into ``RUN/map/``. Then, on the same training split, a KFAC Laplace approximation
over every LoRA weight (:class:`blob_lora.methods.laplace.LaplaceLoRA`: exact GGN of the
option softmax, prior precision by maximising the Laplace evidence over a log grid; under cloze
scoring the head's vocabulary-wide output factor kept as a rank-512 sketch plus the exact
diagonal of the rest, ``results/laplace_head_fidelity/``) is fitted
on the main process; where the adapters leave the lower blocks frozen, the fit starts from
their cached output (``--prefix-cache``, the split's features the MAP run wrote: 0.69x the fit's
time on ARC-C, ``bench/laplace_head.py``).

Run folder: ``RUN/adapter/`` = the MAP adapter (PEFT files) + ``laplace_state.safetensors``
(Kronecker factors and scalars) + ``laplace.json`` (prior precision, fit time, readable).

Prediction: the linearised (GLM) predictive. With N > 0 samples the "samples" are softmaxes
of N logit vectors drawn from its Gaussian, so the predictive is their mean and the
uncertainty decomposition works as for BLoB; N = 0 gives the closed-form probit approximation
as a single "sample". The default is N = 100 (laplace-torch's default for its MC link): the
logit moments cost C backward passes per batch whatever N is, and drawing logits is almost
free, while with few samples the MC average of near one-hot softmaxes is visibly
over-confident (a tiny random model fitted on 8 examples: ECE about 0.49 at N = 3, 0.23 at
N = 1000, whose NLL, 1.389, equals the probit's). An experiment-wide ``eval_samples`` also
applies here unless overridden per method (``method_options: {laplace: {eval_samples: 100}}``
in ``blob-lora compare``).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from blob_lora.methods.base import RunSettings, unwrapped
from blob_lora.methods.composite import Assembly, PostHocMethod, link_tree, training_split_inputs
from blob_lora.methods.io import load_plain_adapter
from blob_lora.models.forward import answer_logits, head_read_mask, is_cloze_batch
from blob_lora.models.loading import to_device
from blob_lora.models.prefix_cache import PrefixFeatureCache
from blob_lora.tasks.dataset import IndexedCollator, IndexedDataset
from blob_lora.utils.atomic import atomic_write_json
from blob_lora.utils.errors import ConfigError, DamagedFileError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from blob_lora.methods.laplace import LaplaceLoRA

STATE_FILE = "laplace_state.safetensors"
INFO_FILE = "laplace.json"

logger = logging.getLogger(__name__)


def _posterior(model: nn.Module) -> LaplaceLoRA:
    la = getattr(model, "laplace_posterior", None)
    if la is None:
        raise RuntimeError("not a Laplace-LoRA model (load it with LaplaceMethod.load)")
    return la


def _check_scoring(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Refuse to predict under another scoring than the fit's. The head's curvature ``G`` was
    fitted on the rows that scoring reads (the option letters' rows, or every option token's
    row under cloze): under the other one the head's predictive variance lies almost all in
    directions the fit never saw, where only the prior speaks (a review measured 96 % of it on
    a tiny model, against none under the fit's own scoring). A posterior saved before the fit's scoring was recorded
    is not checked."""
    fitted = getattr(unwrapped(model), "laplace_fit_scoring", None)
    asked = "cloze" if is_cloze_batch(batch) else "letter"
    if fitted is not None and fitted != asked:
        raise ConfigError(
            f"this Laplace posterior was fitted under {fitted} scoring and cannot predict under "
            f"{asked} scoring (its head's curvature is of the rows {fitted} scoring reads): "
            f"score it with --scoring {fitted}, or train a {asked}-scored run"
        )


def _refuse_inference_mode() -> None:
    """The linearised predictive differentiates the logits, which ``torch.inference_mode()``
    forbids even inside ``torch.enable_grad()`` (it failed with "inputs argument to grad()
    cannot be empty")."""
    if torch.is_inference_mode_enabled():
        raise ConfigError(
            "Laplace-LoRA's predictive differentiates the model's logits (its linearisation), "
            "which torch.inference_mode() forbids: predict outside it (torch.no_grad() is fine)"
        )


def _make_lora_trainable(model: nn.Module) -> None:
    """KFAC needs gradients to flow to exactly the LoRA weights (a loaded adapter is frozen)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def _option_logits_fn(option_ids: torch.Tensor | None, prefix: PrefixFeatureCache | None = None):
    """The forward KFAC's hooks watch, in the fit and the predictive: under cloze scoring the
    output head gets each row's own predicting positions (``head_positions="rows"``), padded
    to the row that needs the most. Not ``"flat"``: that cuts the head's ``lora_B`` input to
    (T, r), and KFAC needs every watched layer's batch dimension. The fit counts only the read
    ones among them as the head's inputs (:func:`_head_mask`).

    With ``prefix`` (the training split's frozen-block features) a batch that carries its
    dataset ``index`` starts at the first adapted block from them: the frozen blocks hold no
    LoRA weight, so the Jacobian KFAC takes is the same (tested), and the LoRA run of the same
    split has usually written them already."""

    def logits_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        index = batch.get("index")
        inputs = {k: v for k, v in batch.items() if k != "index"}
        cached = prefix is not None and index is not None
        with prefix.injected(model, inputs, index) if cached else nullcontext():
            return answer_logits(model, inputs, option_ids, head_positions="rows")

    return logits_fn


def _head_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which of the head's positions are read in a cloze batch (``head_read_mask``); None for
    letter scoring, whose head sees the one last position.

    Why only those: a position whose logits are not read has a zero output gradient, so it
    adds nothing to the GGN, and counting its input in the Kronecker factor ``A`` would only
    dilute it. Counting them also made the head's curvature depend on which questions shared
    a batch: the kept suffix, and so the unread positions in it, is set by the batch's widest
    row (a fit on the same questions in other batches gave another ``A``; tested)."""
    return head_read_mask(batch) if is_cloze_batch(batch) else None


class LaplaceMethod(PostHocMethod):
    """MAP LoRA + KFAC Laplace posterior over the LoRA weights, GLM predictive."""

    name = "laplace"
    # Its GLM predictive differentiates through its forward, but only down to the first adapted
    # block's LoRA outputs: a cached frozen prefix leaves the Jacobian unchanged (tested).
    samples_by_default = 100
    sub_method = "map"  # one MAP run into RUN/map/
    info_file = INFO_FILE
    step_seconds = "fit_seconds"

    checks_sub_models = True

    def check_sub_model(self, model: nn.Module) -> None:
        from blob_lora.methods.laplace.kfac import trainable_linears

        try:
            trainable_linears(model)
        except ConfigError as exc:
            raise ConfigError(
                f"--method laplace: {exc} (their curvature needs per-example gradients KFAC "
                "does not take): drop those layers from --target-modules"
            ) from exc

    def owns(self, model: nn.Module) -> bool:
        # a Laplace model is also a plain LoRA model: recognised by its posterior, or the
        # Python API predicted it as LoRA (no samples, no epistemic part) without a word
        return getattr(unwrapped(model), "laplace_posterior", None) is not None

    def assemble(self, assembly: Assembly) -> tuple[nn.Module | None, dict[str, Any]]:
        """Fit the KFAC posterior to the MAP adapter; store the adapter and the posterior."""
        (map_adapter,) = assembly.sub_adapters
        model = load_plain_adapter(assembly.base, map_adapter)
        to_device(model, assembly.device)
        la, fit_info = fit_laplace(
            model, assembly.tokenizer, assembly.cfg, progress=assembly.progress
        )
        link_tree(map_adapter, assembly.adapter_dir)
        save_file(la.state_dict(), str(assembly.adapter_dir / STATE_FILE))
        atomic_write_json(assembly.adapter_dir / INFO_FILE, fit_info)
        model.laplace_posterior = la
        model.laplace_fit_scoring = fit_info["fit_scoring"]
        return model, fit_info

    def load(self, base: nn.Module, adapter_dir: Path) -> PeftModel:
        from blob_lora.methods.laplace import LaplaceLoRA  # optional: see methods.registry

        adapter_dir = Path(adapter_dir)
        path = adapter_dir / STATE_FILE
        if not path.is_file():
            raise DamagedFileError(f"{path} not found: the run's Laplace posterior is missing")
        model = load_plain_adapter(base, adapter_dir)
        _make_lora_trainable(model)
        la = LaplaceLoRA(model, logits_fn=None)  # the option ids are set per task
        try:
            la.load_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DamagedFileError(f"{path} is corrupt or unreadable: {exc}") from exc
        model.laplace_posterior = la
        model.laplace_fit_scoring = _fit_scoring(adapter_dir / INFO_FILE)
        model.eval()
        return model

    def posterior_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        la = getattr(unwrapped(model), "laplace_posterior", None)
        return dict(la.state_dict()) if la is not None else {}

    def predict_samples(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        option_ids: torch.Tensor | None,
        n_samples: int,
        fold: int | None = None,
    ) -> torch.Tensor:
        """(S, B, C) probabilities from the linearised predictive (S = 1 for the probit)."""
        la = _posterior(model)
        _check_scoring(model, batch)
        _refuse_inference_mode()
        la.logits_fn = _option_logits_fn(option_ids)
        if n_samples == 0:
            return la.predictive(batch, 0).detach().unsqueeze(0)
        return la.predictive_samples(batch, n_samples).detach()


def fit_laplace(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunSettings,
    *,
    progress: bool = False,
) -> tuple[LaplaceLoRA, dict[str, Any]]:
    """Fit the KFAC posterior on ``cfg``'s training split; return it and a readable record."""
    from blob_lora.methods.laplace import LaplaceLoRA  # optional: see methods.registry

    start = time.perf_counter()
    device = next(model.parameters()).device
    split, inputs = training_split_inputs(cfg, tokenizer, device)
    loader = DataLoader(
        IndexedDataset(inputs.dataset),
        batch_size=cfg.loop.batch_size,
        shuffle=False,
        collate_fn=IndexedCollator(inputs.collator),
    )
    option_ids = inputs.option_ids
    _make_lora_trainable(model)
    prefix = (
        PrefixFeatureCache.for_dataset(model, inputs.dataset, cfg.data.cache_dir, keep=False)
        if cfg.base.prefix_cache
        else None
    )
    la = LaplaceLoRA(model, _option_logits_fn(option_ids, prefix), head_mask_fn=_head_mask)
    batches = (
        {k: v.to(device) for k, v in b.items()}
        for b in tqdm(loader, desc="laplace fit", disable=not progress, leave=False)
    )
    la.fit(batches)
    if prefix is not None:
        prefix.save()  # features this fit computed serve every later run on the split
    prior_precision = la.optimize_prior_precision()
    info = {
        "prior_precision": prior_precision,
        "n_data": la.n_data,
        "n_params": la.n_params,
        "log_marginal_likelihood": la.log_marginal_likelihood(),
        "fit_split": split,
        # the scoring whose rows the head's curvature is of: prediction refuses another one
        "fit_scoring": cfg.data.scoring_spec.mode,
        # layers whose G was too wide to store (the head under cloze scoring): the share of
        # its trace the rank-limited sketch kept (methods/laplace/kfac.py)
        "g_sketch_trace_kept": la.g_sketch_kept,
        # and a bound on the curvature a dropped direction lost, over the prior precision:
        # well below 1, a larger sketch would not move the predictive; above it the dropped
        # directions may hold most of the predictive's variance (LaplaceLoRA docs; the regime
        # table's full training splits: 151-1,020, results/laplace_variance/) unless the fit
        # kept the dropped part's diagonal (g_residual "diag", the default)
        "g_sketch_curvature_lost": la.g_sketch_curvature_lost(),
        "g_residual": la.g_residual,
        "fit_seconds": round(time.perf_counter() - start, 3),
    }
    warn_dropped_curvature(la)
    model.eval()
    return la, info


def _fit_scoring(info_path: Path) -> str | None:
    """The fit's scoring as ``laplace.json`` records it; ``None`` for a posterior saved before
    it was recorded, or without the file (a posterior stored by hand)."""
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    scoring = info.get("fit_scoring") if isinstance(info, dict) else None
    return scoring if scoring in ("letter", "cloze") else None


def warn_dropped_curvature(la: LaplaceLoRA) -> list[str]:
    """Warn for every layer whose sketched ``G`` dropped curvature above the prior precision
    (``g_sketch_curvature_lost`` > 1) and kept no residual diagonal; returns those layers.

    Why: without the diagonal the posterior keeps the prior's precision in the dropped
    directions, so there the predictive can be far broader than a full factor would make it
    (the regime table's head under cloze scoring: ~95 % of the logit variance,
    ``results/laplace_variance/``). With it, every coordinate keeps its curvature and the
    error is the dropped part's off-diagonal, measured in ``paper/laplace_head_fidelity.py``."""
    flagged = []
    for layer, lost in la.g_sketch_curvature_lost().items():
        if lost > 1.0 and not la.layers[layer].has_resid:
            flagged.append(layer)
            logger.warning(
                "Laplace fit: %s's output factor was kept as a rank-%d sketch that dropped "
                "curvature up to %.3g times the prior precision; the posterior keeps the prior "
                "there, so the predictive may be much broader than a full factor would make it "
                "(paper/laplace_variance.py measures how much of it)",
                layer,
                int(la.layers[layer].g_vals.numel()),
                lost,
            )
    return flagged
