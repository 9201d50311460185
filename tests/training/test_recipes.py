"""``--recipe``: a named set of settings applied where the field still holds its default,
stored resolved in run_config.json, refused by name when unknown."""

from __future__ import annotations

import pytest

from blob_lora.training.config import TrainConfig
from blob_lora.training.recipes import RECIPES
from blob_lora.utils.errors import ConfigError


def test_paper_is_the_default_and_changes_nothing() -> None:
    cfg = TrainConfig()
    assert cfg.recipe == "paper" and RECIPES["paper"] == {}
    assert (cfg.loop.optimizer, cfg.kl.kl_schedule, cfg.kl.std_lr) == ("paper", "geometric", None)


def test_elbo_adam_sets_its_settings_and_explicit_ones_win() -> None:
    cfg = TrainConfig(recipe="elbo-adam")
    assert (cfg.loop.optimizer, cfg.kl.kl_schedule, cfg.kl.std_lr) == ("single", "elbo", 1e-2)
    assert cfg.loop.lr == TrainConfig().loop.lr  # settings outside the recipe keep their defaults
    mine = TrainConfig(recipe="elbo-adam", std_lr=3e-2, kl_schedule="uniform")
    assert (mine.loop.optimizer, mine.kl.kl_schedule, mine.kl.std_lr) == ("single", "uniform", 3e-2)


def test_no_rescale_is_the_paper_schedule_with_one_cycle_per_epoch() -> None:
    cfg = TrainConfig(recipe="no-rescale")
    assert cfg.kl.kl_rescale is False
    assert (cfg.kl.kl_schedule, cfg.loop.optimizer) == ("geometric", "paper")


def test_stored_config_reads_back_the_same() -> None:
    cfg = TrainConfig(recipe="elbo-adam", lr=5e-4)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("bad", ["adam", "", 3, None])
def test_unknown_recipe_is_refused_by_name(bad) -> None:
    with pytest.raises(ConfigError, match="--recipe must be one of"):
        TrainConfig(recipe=bad)


def test_replacing_the_recipe_takes_back_what_the_old_one_set() -> None:
    """``replace(recipe=...)`` gives what a fresh config with that recipe gives, not the new
    name over the old recipe's values (run_config.json would have named the wrong recipe)."""
    elbo = TrainConfig(recipe="elbo-adam", lr=5e-4)
    paper = elbo.replace(recipe="paper")
    assert paper == TrainConfig(recipe="paper", lr=5e-4)
    assert (paper.loop.optimizer, paper.kl.kl_schedule, paper.kl.std_lr) == (
        "paper",
        "geometric",
        None,
    )
    assert elbo.replace(recipe="no-rescale") == TrainConfig(recipe="no-rescale", lr=5e-4)
    # a setting of the user's own (not the old recipe's value) stays; so does one changed
    # in the same call
    mine = TrainConfig(recipe="elbo-adam", std_lr=3e-2).replace(recipe="paper")
    assert mine.kl.std_lr == 3e-2 and mine.loop.optimizer == "paper"
    both = elbo.replace(recipe="paper", kl_schedule="elbo")
    assert both.kl.kl_schedule == "elbo" and both.loop.optimizer == "paper"
    assert elbo.replace(lr=1e-3).kl.kl_schedule == "elbo"  # the same recipe: nothing taken back
