"""Named recipes: coherent sets of BLoB training settings, chosen with one ``--recipe`` option.

``paper`` (the default, the reproduction's setting of record) is the authors' procedure: the
geometric KL schedule with dataset rescaling, AdamW on the NLL for the mean and ``B``, and
plain SGD at ``kl_lr`` on ``pi * KL`` that alone steps the std parameters. Under it the std of
``A`` ends where the KL schedule puts it (~0.026 in the demo's regime), the same value in every
element: the data's gradient on the std is about 1e-3 of the KL's, and N = 10 samples predict
like the mean weights (README, "Where the small model learns", item 4).

``no-rescale`` is the paper's schedule with one cycle per epoch (``K`` = steps per epoch, no
dataset rescaling): on small training sets a KL several times stronger, which carries the std
of ``A`` near the prior (~0.16) and the model towards the base model. ``make demo`` runs it.

``elbo-adam`` is the textbook variational objective: the exact per-example ELBO weight
(``pi = 1/n`` every step, no cycle) and one AdamW on ``NLL + pi * KL`` for every parameter, the
std at its own rate ``std_lr`` = 1e-2. It was offered for issue 19's question whether the std
can learn from the data when Adam, whose step does not scale with the gradient, steps it. It
does not, at these budgets: on held-out training questions of ARC-Easy and WinoGrande-S the
std ends at 0.15-0.17 in every element of every layer, the same spread in each (the spread of
its initial values, carried along), and the KL also pulls the mean of ``A`` in the attention
layers to ~0 (``results/demo_regime/``, ``results/recipe_wg_s/``). Its calibration is close to
``no-rescale``'s.

A recipe changes settings from their defaults; a setting given explicitly (a value other than
its default) wins over the recipe. ``run_config.json`` stores the recipe and the settings it
resolved to, so a resumed run reads back the same values.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "no-rescale": {"kl_rescale": False},
    "elbo-adam": {"optimizer": "single", "kl_schedule": "elbo", "std_lr": 1e-2},
}
