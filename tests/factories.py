"""The one place tests build tiny models and tokenizers: random 2-block Llamas (and a GPT-2) and
character-level tokenizers, nothing downloaded.

Why: a unit test needs a model that runs in milliseconds on a CPU and a tokenizer that reads in
milliseconds (the real SmolLM2 tokenizer takes ~20 s from its GGUF). Every test, the fault
drills and ``bench/scoring.py``'s smoke setting build them here, so a change of shape or
vocabulary is made once.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: every printable ASCII character plus the Metaspace marker and a newline, one piece each
CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁\n"))


def tiny_llama(
    seed: int = 0, vocab_size: int = 128, dtype: torch.dtype = torch.float32, **config: Any
):
    """A random 2-block Llama (hidden 32, 4 heads), in eval mode; ``config`` overrides any
    ``LlamaConfig`` field (e.g. ``pad_token_id``, whose embedding row starts at zero)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab_size,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings)).to(dtype).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 128):
    """A random 2-block GPT-2 (hidden 32, 4 heads), in eval mode: its attention and MLP
    projections are transformers' ``Conv1D`` (weight stored ``in x out``), not ``nn.Linear``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


#: the modules tiny LoRA and BLoB models adapt
TARGETS = ["q_proj", "v_proj", "lm_head"]


def _tiny_tuner(build, options, seed: int, base=None):
    """``build(base, LoraConfig, options)`` (a tuner's ``get_*_model``) at rank 4 on
    :data:`TARGETS` of :func:`tiny_llama`, the global RNG then seeded for the caller's draws."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = build(tiny_llama(seed) if base is None else base, lora, options)
    torch.manual_seed(seed + 100)
    return model


def _one_layer_tuner(build, options, layer_class: type, seed: int):
    """``build`` (a tuner's ``get_*_model``) at rank 3 on a single 6 -> 5 linear layer; the
    model and that layer, checked to be ``layer_class``."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    model = build(_OneLinear(), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"]), options)
    layer = model.base_model.model.proj
    assert isinstance(layer, layer_class)
    return model, layer


def tiny_blob_model(seed: int = 0, std: tuple[float, float] = (0.2, 0.4), **blob_settings: Any):
    """:func:`tiny_llama` with BLoB (rank 4) on q/v/lm_head, ``lora_B`` and the std drawn
    large, as after training, so that weight samples reach the output; ``std = (0, 0)``
    leaves no std. ``blob_settings`` are ``BlobConfig`` fields."""
    from blob_lora import BlobConfig, get_blob_model

    model = _tiny_tuner(get_blob_model, BlobConfig(**blob_settings), seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
            if "lora_A_rho" in name:
                p.uniform_(*std) if std[1] > 0 else p.zero_()
    return model


def draw_adapter_weights(model, seed: int = 1):
    """Every adapter weight of a BLoB, Bayesian-LoRA or ABMLL model drawn away from its start
    (``B`` non-zero, the std of ``A`` large), as after training, so that both the mean adapter
    and the samples reach the output; Bayesian-LoRA's mean copies refreshed. ``model``."""
    from blob_lora.tuners.bayesian_lora.model import refresh_mean_weights

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_sigma_B" in name:
                p.normal_(std=0.3)
            elif "lora_inducing" in name:
                p.add_(0.1 * torch.randn_like(p))
                if name.endswith("u_mean"):
                    p.mul_(30.0)
            elif "lora_A_rho" in name:
                p.uniform_(0.2, 0.4)
    refresh_mean_weights(model)  # a no-op without Bayesian-LoRA layers
    return model


def one_layer_model(flipout: str, seed: int = 0):
    """BLoB (rank 3) on a single 6 -> 5 linear layer, its ``A``, ``B`` and std drawn large;
    returns the model and that ``BlobLinear`` (analytic checks of the sampled output)."""
    from blob_lora import BlobConfig, get_blob_model
    from blob_lora.tuners.blob.layer import BlobLinear

    options = BlobConfig(flipout=flipout, init_std=0.5)
    model, layer = _one_layer_tuner(get_blob_model, options, BlobLinear, seed)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_A["default"].weight.normal_()
        layer.lora_A_rho["default"].uniform_(0.5, 1.0)
    return model, layer


def tiny_bayesian_lora_model(seed: int = 0, **settings: Any):
    """:func:`tiny_llama` with Bayesian-LoRA (rank 4) on q/v/lm_head, every posterior parameter
    moved away from its initial value (``u_mean`` scaled up so the factors reach the output),
    as after training. ``settings`` are ``BayesianLoraConfig`` fields; every target is
    Bayesian unless ``layers`` says otherwise (the method's default leaves v_proj plain)."""
    from blob_lora.tuners.bayesian_lora import BayesianLoraConfig, get_bayesian_lora_model

    options = BayesianLoraConfig(**{"layers": ".*", **settings})
    model = _tiny_tuner(get_bayesian_lora_model, options, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_inducing" in name:
                p.add_(0.1 * torch.randn_like(p))
                if name.endswith("u_mean"):
                    p.mul_(30.0)
    return model


def one_layer_bayesian_lora(seed: int = 0, **settings: Any):
    """Bayesian-LoRA (rank 3) on a single 6 -> 5 linear layer with 2 x 2 inducing matrices;
    returns the model and that layer (analytic checks)."""
    from blob_lora.tuners.bayesian_lora import BayesianLoraConfig, get_bayesian_lora_model
    from blob_lora.tuners.bayesian_lora.layer import BayesianLoraLinear

    options = BayesianLoraConfig(
        **{"inducing_rows": 2, "inducing_cols": 2, "layers": ".*", **settings}
    )
    return _one_layer_tuner(get_bayesian_lora_model, options, BayesianLoraLinear, seed)


def tiny_abmll_model(seed: int = 0, attn_implementation: str | None = None, **settings: Any):
    """:func:`tiny_llama` with ABMLL (rank 4) on q/v/lm_head, every global pair drawn away
    from its initial value (``B`` and ``B_sigma`` non-zero), as after meta-training.
    ``settings`` are ``AbmllConfig`` fields; ``attn_implementation="eager"`` for second
    derivatives (CPU's fused attention has none)."""
    from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model

    base = tiny_llama(seed)
    if attn_implementation is not None:
        base.config._attn_implementation = attn_implementation
    model = _tiny_tuner(get_abmll_model, AbmllConfig(**settings), seed, base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
            if "lora_sigma_B" in name:
                p.normal_(std=0.01)
    return model


def one_layer_abmll(seed: int = 0, **settings: Any):
    """ABMLL (rank 3) on a single 6 -> 5 linear layer, its global pairs drawn; returns the
    model and that layer (analytic checks)."""
    from blob_lora.tuners.abmll import AbmllConfig, get_abmll_model
    from blob_lora.tuners.abmll.layer import AbmllLinear

    model, layer = _one_layer_tuner(get_abmll_model, AbmllConfig(**settings), AbmllLinear, seed)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.5)
        layer.lora_sigma_B["default"].weight.normal_(std=0.1)
    return model, layer


class _OneLinear(torch.nn.Module):
    def __init__(self, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def char_tokenizer(words: Sequence[str], *, bos: bool = False):
    """A Unigram tokenizer over single characters plus the whole pieces ``words``
    (Llama-style leading-space pieces such as ``"▁A"``); ``bos`` prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(w, -1.0) for w in words] + [(c, -5.0) for c in CHARS]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_tokenizer():
    """The character tokenizer runs use: every task's answer is one token (" A".." E",
    " True"/" False"); padding with EOS on the left, as ``blob_lora.models.load_tokenizer``."""
    tok = char_tokenizer(["▁Answer", "▁Question", "▁True", "▁False"] + [f"▁{c}" for c in "ABCDE"])
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def llama_style_tokenizer(letters: str = "ABCDE"):
    """Llama's conventions (leading-space pieces, ``<s>`` in front), no pad token. Only
    ``▁<letter>`` for ``letters`` are whole pieces, so leaving a letter out makes its answer
    token two pieces."""
    words = ["▁Answer", "Answer", "▁Question", "▁True", "▁False", "▁the", "▁Which"]
    return char_tokenizer(words + [f"▁{c}" for c in letters], bos=True)


def tiny_base(tokenizer, seed: int = 0):
    """A random tiny Llama over ``tokenizer``'s vocabulary (its pad token's row zero)."""
    return tiny_llama(
        seed,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_model_folder(path: Path, model, tokenizer) -> Path:
    """``model`` (safetensors) and ``tokenizer`` in ``path``: a folder ``--model`` accepts."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_model_folder(path: Path, seed: int = 0) -> Path:
    """A random tiny Llama and the character tokenizer in ``path``."""
    tok = tiny_tokenizer()
    return save_model_folder(path, tiny_base(tok, seed), tok)


def tiny_compare_experiment(model_dir: Path, methods: list[str], **extra: Any) -> dict[str, Any]:
    """A ``blob-lora compare`` experiment file's content: ``methods`` on WinoGrande-S seed 1,
    2 steps of 4 of its first 8 training sentences on the tiny model in ``model_dir``, scored
    on 6 validation sentences; ``extra`` adds or replaces top-level keys."""
    exp: dict[str, Any] = {
        "methods": methods,
        "tasks": ["winogrande_s"],
        "seeds": [1],
        "train": {
            "model": str(model_dir),
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 256,
            "lr": 0.01,
            "target_modules": ["q_proj", "v_proj"],
            "train_split": "train_s[:8]",
        },
        "eval_split_overrides": {"winogrande_s": "validation[:6]"},
    }
    exp.update(extra)
    return exp


# ---------------------------------------------------------------------------------------------
# tiny runs

#: the slice tiny runs train and evaluate on: 8 WinoGrande examples, 6 held out
TINY_TASK = "winogrande_s"
TINY_TRAIN_SPLIT = "train_s[:8]"
TINY_EVAL_SPLIT = "validation[:6]"


def tiny_run_config(out: Path, data_root: Path, method: str, **overrides: Any):
    """Settings of a 3-step run of ``method`` on the tiny slice into ``out`` (the model is
    handed to :func:`train_tiny`; ``model`` names none)."""
    from blob_lora.training.config import TrainConfig

    settings: dict[str, Any] = {
        "model": "unused",
        "task": TINY_TASK,
        "method": method,
        "out": str(out),
        "data_root": str(data_root),
        "train_split": TINY_TRAIN_SPLIT,
        "eval_split": TINY_EVAL_SPLIT,
        "max_steps": 3,
        "batch_size": 4,
        "eval_batch_size": 6,
        "max_length": 256,
        "lr": 1e-2,
        "target_modules": ["q_proj", "v_proj"],
        "eval_samples": 4,
        "ensemble_size": 2,
        # 3 steps of 2 per epoch: SWAG collects after steps 2 and 3 (once per epoch: 1 iterate)
        "swag_every": 1,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def train_tiny(cfg, base, tokenizer, **kwargs: Any) -> dict[str, Any]:
    """``blob_lora.pipeline.train`` on a copy of ``base`` (PEFT wraps the model it is given)."""
    import copy

    from blob_lora.pipeline import train

    return train(cfg, progress=False, base_model=copy.deepcopy(base), tokenizer=tokenizer, **kwargs)


# ---------------------------------------------------------------------------------------------
# tiny task collections (meta-learning)


def tiny_task_collection(root: Path, n_tasks: int = 3, n_questions: int = 10) -> Path:
    """``root`` holding ``n_tasks`` task folders (``task0``, ...), each a ``validation.jsonl``
    of ``n_questions`` short 3-option questions (answers drawn, seeded by the task): a
    collection ``meta-train`` reads as a folder of the user's own tasks."""
    import json
    import random

    for t in range(n_tasks):
        rng = random.Random(t)
        folder = root / f"task{t}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "id": f"t{t}q{i}",
                "question": f"Task {t}, item {i}: which?",
                "choices": ["red", "blue", "green"],
                "answer": rng.randrange(3),
            }
            for i in range(n_questions)
        ]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / "validation.jsonl").write_text(text, encoding="utf-8")
    return root
