"""Named recipes: coherent sets of BLoB training settings, chosen with one ``--recipe`` option.

``paper`` (the default, the reproduction's setting of record) is the authors' procedure: the
geometric KL schedule with dataset rescaling, AdamW on the NLL for the mean and ``B``, and
plain SGD at ``kl_lr`` on ``pi * KL`` that alone steps the std parameters. Under it the std of
``A`` ends where the KL schedule puts it, the same value in every element: the data's gradient
on the std is about 1e-3 of the KL's (README, "Where the small model learns", item 4).

``elbo-adam`` lets the std learn from the data: the exact per-example ELBO weight (``pi = 1/n``
every step, no cycle) and one AdamW on ``NLL + pi * KL`` for every parameter, the std at its
own rate ``std_lr`` = 1e-2. Adam's step does not scale with the gradient's size, so the std
moves until the data's pull (noise that raises the NLL) balances the prior's (a std below
``prior_std`` costs KL), element by element.

A recipe changes settings from their defaults; a setting given explicitly (a value other than
its default) wins over the recipe. ``run_config.json`` stores the recipe and the settings it
resolved to, so a resumed run reads back the same values.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "elbo-adam": {"optimizer": "single", "kl_schedule": "elbo", "std_lr": 1e-2},
}
