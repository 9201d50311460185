"""What cannot run under FSDP is refused before anything is written, naming what to do instead
(issue 21.1); no processes are launched here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from blob_lora.training.distributed import check_fsdp_settings, check_launch
from blob_lora.utils.errors import ConfigError


def _accelerator(kind, fsdp2=False, mixed_precision="no"):
    return SimpleNamespace(
        distributed_type=kind, is_fsdp2=fsdp2, mixed_precision=mixed_precision, num_processes=2
    )


@pytest.fixture(autouse=True)
def two_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)


def test_fsdp2_is_accepted_fsdp1_and_deepspeed_are_refused() -> None:
    check_launch(_accelerator(DistributedType.FSDP, fsdp2=True))
    check_launch(_accelerator(DistributedType.MULTI_GPU))
    with pytest.raises(ConfigError, match=r"FSDP1.*--use_fsdp --fsdp_version 2"):
        check_launch(_accelerator(DistributedType.FSDP, fsdp2=False))
    with pytest.raises(ConfigError, match=r"DeepSpeed is not supported.*--fsdp_version 2"):
        check_launch(_accelerator(DistributedType.DEEPSPEED))


def test_fsdp_asked_for_but_not_run_is_refused(monkeypatch) -> None:
    """On CPUs ``ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp`` runs plain MULTI_CPU data
    parallelism: refused rather than silently replicating the model."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"GPUs only.*ACCELERATE_USE_CPU=1 accelerate launch"):
        check_launch(_accelerator(DistributedType.MULTI_CPU))
    check_launch(_accelerator(DistributedType.FSDP, fsdp2=True))


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantised_base_under_fsdp_is_refused(flag) -> None:
    kw = {"load_in_4bit": flag == "load_in_4bit", "load_in_8bit": flag == "load_in_8bit"}
    name = "--" + flag.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"{name} cannot be combined with FSDP") as exc:
        check_fsdp_settings(_accelerator(DistributedType.FSDP, fsdp2=True), **kw)
    assert "--dtype bfloat16" in str(exc.value) and "--multi_gpu" in str(exc.value)
    check_fsdp_settings(_accelerator(DistributedType.MULTI_GPU), **kw)  # fine under DDP


def test_fp16_under_fsdp_is_refused_bf16_is_not() -> None:
    fp16 = _accelerator(DistributedType.FSDP, fsdp2=True, mixed_precision="fp16")
    with pytest.raises(ConfigError, match=r"--mixed_precision bf16"):
        check_fsdp_settings(fp16, load_in_4bit=False, load_in_8bit=False)
    bf16 = _accelerator(DistributedType.FSDP, fsdp2=True, mixed_precision="bf16")
    check_fsdp_settings(bf16, load_in_4bit=False, load_in_8bit=False)


@pytest.mark.parametrize("method", ["ensemble", "multiswag", "laplace", "tfb"])
def test_composite_methods_under_fsdp_are_refused(method, tmp_path, monkeypatch) -> None:
    from blob_lora.pipeline import train
    from blob_lora.training import TrainConfig

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = TrainConfig(method=method, out=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ConfigError, match=rf"--method {method} is not supported under FSDP"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_bayesian_lora_under_fsdp_is_refused_before_it_builds(monkeypatch) -> None:
    from blob_lora.methods import get_method
    from blob_lora.training import TrainConfig
    from tests.factories import tiny_llama

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    method = get_method("bayesian-lora")
    with pytest.raises(
        ConfigError, match=r"bayesian-lora is not supported under FSDP.*--multi_gpu"
    ):
        method.build(tiny_llama(0), TrainConfig(method="bayesian-lora"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert method.owns(method.build(tiny_llama(0), TrainConfig(method="bayesian-lora")))


@pytest.mark.parametrize("name", ["swag", "bayesian-lora"])
def test_a_method_that_cannot_shard_is_refused_by_the_trainer(name) -> None:
    """Refused by ``prepare_training`` before the model loads and the folder is made (swag's
    refusal came at its first step and left a folder that blocked the retry; a resumed run
    past step 1 was not refused at all and crashed at the end)."""
    from blob_lora.methods import get_method
    from blob_lora.training.distributed import check_fsdp_method

    method = get_method(name)
    fsdp = _accelerator(DistributedType.FSDP, fsdp2=True)
    with pytest.raises(ConfigError, match=rf"--method {name} is not supported under FSDP \(.+"):
        check_fsdp_method(fsdp, method.name, method.fsdp_refusal)
    check_fsdp_method(_accelerator(DistributedType.MULTI_GPU), method.name, method.fsdp_refusal)
    blob = get_method("blob")
    check_fsdp_method(fsdp, blob.name, blob.fsdp_refusal)  # BLoB shards


def test_the_composite_refusal_names_only_methods_that_shard(monkeypatch) -> None:
    from blob_lora.pipeline.composite import refuse_under_fsdp
    from blob_lora.training import TrainConfig

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError) as exc:
        refuse_under_fsdp(TrainConfig(method="ensemble"))
    shardable = str(exc.value).rsplit("(", 1)[1].removesuffix(") under FSDP").split(", ")
    assert {"blob", "lora", "map", "mc-dropout"} <= set(shardable)
    assert not {"swag", "bayesian-lora", "abmll", "ensemble", "multiswag"} & set(shardable)


def test_curve_every_on_several_processes_is_refused_before_the_folder() -> None:
    from blob_lora.training.distributed import check_curve_launch

    with pytest.raises(ConfigError, match="--curve-every runs on one process only"):
        check_curve_launch(_accelerator(DistributedType.MULTI_CPU), 4)
    check_curve_launch(_accelerator(DistributedType.MULTI_CPU), 0)
    check_curve_launch(SimpleNamespace(num_processes=1), 4)
