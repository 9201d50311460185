"""The ``blob-lora compare`` experiment file: methods × tasks × seeds, plus the OOD protocol.

YAML schema (every key but ``methods`` optional; unknown keys are refused)::

    name: wgs_small                    # default: the file name without extension
    out: experiments/out/wgs_small     # default: runs/compare/<name>; --out wins
    methods: [lora, map, mc-dropout, ensemble, laplace, blob, blob-mean, blob-elbo]
    variants:                                     # a method again, under other settings
      blob-elbo: {method: blob, optimizer: single, kl_schedule: elbo, std_lr: 1.0e-2}
    tasks: [winogrande_s, arc_challenge]          # in-distribution: train + eval on each
    seeds: [1, 2, 3]                              # default [1, 2, 3]
    run_first: [lora, blob, map]                  # these methods' runs, every seed, go first
    # or tiers: [[lora, blob], [mc-dropout, ensemble]]  each tier, every seed, before the next
    ood:                                          # train on train_task, evaluate elsewhere
      train_task: openbookqa
      eval_tasks: [arc_challenge, arc_easy, mmlu:college_chemistry, mmlu:college_physics]
    train: {max_steps: 300, lr: 1.0e-3, ...}      # TrainConfig keys shared by every run
    method_options: {blob: {kl_gamma: 8}, map: {weight_decay: 1.0e-5}}
    task_options: {boolq: {train_split: "validation[:2270]", eval_split: "validation[2270:]"}}
    eval_split_overrides: {arc_easy: "validation[:100]"}   # wherever that task is evaluated

A column of ``methods`` is a registered method, a ``variant`` (a name for a method trained
with other settings, e.g. BLoB under another recipe beside the paper's, each with its own runs
under ``runs/<task>/<variant>/``), or ``<m>-mean`` for a method or variant ``m`` whose method
reports its mean weights (``Method.mean_column``: BLoB's "BLoB-Mean"): not a training method,
``m``'s runs evaluated once more with ``eval_samples = 0``. ``task``, ``method``, ``seed`` and
``out`` are set per run and may not appear in ``train``/``method_options``/``task_options`` or a
variant's settings. Precedence of settings, lowest first: TrainConfig defaults, ``train``,
``method_options[method]`` (a variant's method included), the variant's own settings,
``task_options[task]``; ``--data-root`` on the command line overrides ``data_root``. A key of
``method_options[m]`` or of a variant that its method does not read (``unread_settings``:
``prior_std`` for ``lora``) is refused; ``train`` serves every method, so it may hold any.

Order of runs: seed, then method (as listed), then task; methods named in ``run_first`` run
for every seed before the others start (the comparison a table exists for is then complete
first, rather than every baseline on one seed). A list of lists in ``run_first`` is a sequence
of tiers, each finished for every seed before the next starts, then the unnamed methods (an
experiment that serves several questions completes the most pressing one's methods first).

Evaluation split of a task T (own task or OOD): ``eval_split_overrides[T]``, else
``task_options[T].eval_split``, else ``train.eval_split`` for a run's own task, else T's
default eval split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blob_lora.methods import METHODS, get_method
from blob_lora.tasks.dir_names import check_distinct_dirs
from blob_lora.training.config import SETTINGS, TrainConfig, unread_settings
from blob_lora.utils.errors import ConfigError
from blob_lora.utils.yaml_file import load_yaml

MEAN_SUFFIX = "-mean"
PER_RUN_KEYS = ("task", "method", "seed", "out")
TOP_KEYS = {
    "name",
    "out",
    "methods",
    "tasks",
    "seeds",
    "ood",
    "train",
    "method_options",
    "task_options",
    "eval_split_overrides",
    "run_first",
    "variants",
}


@dataclass(frozen=True)
class Column:
    """One row of the tables: a training method and how its runs are evaluated.

    ``key``/``subdir`` say where its evaluations live: ``RUN/summary.json[key][task]`` and
    ``RUN/<subdir>/<task>/``. Ordinary methods use the trainer's own (``evaluations``,
    ``eval``); ``blob-mean`` uses ``evaluations_mean`` and ``eval_mean``.
    """

    name: str
    #: the runs it reads: a method's or a variant's (``RUN = runs/<task>/<train_method>/seedS``)
    train_method: str
    eval_samples: int | None = None
    key: str = "evaluations"
    subdir: str = "eval"


def column_for(name: str, variants: dict[str, dict[str, Any]] | None = None) -> Column:
    """The column ``name`` of ``methods``: a method, a variant, or ``<method or variant>-mean``."""
    variants = variants or {}
    if name in METHODS or name in variants:
        return Column(name, name)
    base = name.removesuffix(MEAN_SUFFIX)
    known = base != name and (base in METHODS or base in variants)
    if known and get_method(_method_of(base, variants)).mean_column:
        return Column(name, base, eval_samples=0, key="evaluations_mean", subdir="eval_mean")
    with_mean = sorted(
        f"{m}{MEAN_SUFFIX}"
        for m in [*METHODS, *variants]
        if get_method(_method_of(m, variants)).mean_column
    )
    raise ConfigError(
        f"compare: unknown method {name!r}; known: {sorted(METHODS)}, the variants "
        f"{sorted(variants)} and {with_mean}"
    )


def _method_of(train_method: str, variants: dict[str, dict[str, Any]]) -> str:
    """The registered method a column's runs train (a variant's, or the name itself)."""
    variant = variants.get(train_method)
    return variant["method"] if variant else train_method


@dataclass(frozen=True)
class OodSpec:
    train_task: str
    eval_tasks: list[str]


@dataclass
class CompareSpec:
    name: str
    out: Path
    methods: list[str]
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    ood: OodSpec | None = None
    train: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_split_overrides: dict[str, str] = field(default_factory=dict)
    #: tiers of columns whose runs go first, each tier every seed before the next
    run_first: list[list[str]] = field(default_factory=list)
    #: variant name -> {"method": a registered method, TrainConfig keys...}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def columns(self) -> list[Column]:
        return [column_for(m, self.variants) for m in self.methods]

    def method_of(self, train_method: str) -> str:
        """The registered method a column's runs train (a variant's, or the name itself)."""
        return _method_of(train_method, self.variants)

    @property
    def train_methods(self) -> list[str]:
        """Methods that need runs, in first-use order (``blob-mean`` needs ``blob``)."""
        seen: list[str] = []
        for c in self.columns:
            if c.train_method not in seen:
                seen.append(c.train_method)
        return seen

    @property
    def run_order(self) -> list[tuple[int, str]]:
        """(seed, training method) pairs in the order their runs go (see the module doc)."""
        tiers = [
            {column_for(m, self.variants).train_method for m in tier} for tier in self.run_first
        ]
        groups: list[list[str]] = []
        placed: set[str] = set()  # a method trains in the first tier that names it
        for tier in [*tiers, set(self.train_methods)]:
            groups.append([m for m in self.train_methods if m in tier and m not in placed])
            placed.update(tier)
        return [(seed, m) for group in groups for seed in self.seeds for m in group]

    @property
    def train_tasks(self) -> list[str]:
        tasks = list(self.tasks)
        if self.ood and self.ood.train_task not in tasks:
            tasks.append(self.ood.train_task)
        return tasks

    def eval_split(self, task: str, own: bool) -> str | None:
        """Split to evaluate ``task`` on (None: the task's default); see the module doc."""
        if task in self.eval_split_overrides:
            return self.eval_split_overrides[task]
        split = self.task_options.get(task, {}).get("eval_split")
        if split is None and own:
            split = self.train.get("eval_split")
        return split

    def eval_tasks_of(self, task: str) -> list[str]:
        """Tasks a run trained on ``task`` is evaluated on: itself, plus OOD tasks if any."""
        tasks = [task]
        if self.ood and task == self.ood.train_task:
            tasks += [t for t in self.ood.eval_tasks if t != task]
        return tasks

    def run_settings(self, task: str, train_method: str, seed: int, out: Path) -> dict[str, Any]:
        """TrainConfig keys of one run of a method or variant (module doc: precedence)."""
        method = self.method_of(train_method)
        settings = dict(self.train)
        settings.update(self.method_options.get(method, {}))
        variant = self.variants.get(train_method, {})
        settings.update({k: v for k, v in variant.items() if k != "method"})
        settings.update(self.task_options.get(task, {}))
        split = self.eval_split(task, own=True)
        if split is not None:
            settings["eval_split"] = split
        settings.update(task=task, method=method, seed=seed, out=str(out))
        return settings

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "out": str(self.out),
            "methods": self.methods,
            "tasks": self.tasks,
            "seeds": self.seeds,
            "ood": None
            if self.ood is None
            else {"train_task": self.ood.train_task, "eval_tasks": self.ood.eval_tasks},
            "train": self.train,
            "method_options": self.method_options,
            "task_options": self.task_options,
            "eval_split_overrides": self.eval_split_overrides,
            # as written: one tier stays the flat list older files (and compare.json) hold
            "run_first": self.run_first[0] if len(self.run_first) == 1 else self.run_first,
            "variants": self.variants,
        }


def _normalise_keys(d: Any, where: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"compare: {where} must be a mapping, got {type(d).__name__}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def _train_keys(d: Any, where: str) -> dict[str, Any]:
    d = _normalise_keys(d, where)
    known = set(SETTINGS)
    fixed = sorted(set(d) & set(PER_RUN_KEYS))
    if fixed:
        raise ConfigError(f"compare: {where} may not set {fixed} (set per run by compare)")
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"compare: unknown settings in {where}: {unknown}")
    for key in ("target_modules", "eval_tasks", "bayesian_layers"):
        if isinstance(d.get(key), str):
            d[key] = [p.strip() for p in d[key].split(",") if p.strip()]
    return d


def _str_list(value: Any, where: str, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"compare: {where} must be a list of names, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"compare: {where} must not be empty")
    if len(set(value)) != len(value):
        raise ConfigError(f"compare: {where} lists a name twice: {value}")
    return list(value)


def _run_tiers(value: Any) -> list[list[str]]:
    """``run_first``: a list of names (one tier) or a list of such lists (tiers in order)."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        tiers = [_str_list(v, "run_first's tier", allow_empty=False) for v in value]
    else:
        tiers = [_str_list(value, "run_first", allow_empty=True)]
    flat = [m for tier in tiers for m in tier]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"compare: run_first names a method in two tiers: {tiers}")
    return [tier for tier in tiers if tier]


def spec_from_dict(data: dict[str, Any], name: str, out: str | Path | None = None) -> CompareSpec:
    """Validate a parsed experiment file; ``out`` (the ``--out`` option) wins over its key."""
    if not isinstance(data, dict):
        raise ConfigError("compare: the experiment file must hold a mapping")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"compare: unknown keys {unknown}; known: {sorted(TOP_KEYS)}")
    if "methods" not in data:
        raise ConfigError("compare: the experiment file needs 'methods'")
    name = str(data.get("name") or name)
    methods = _str_list(data["methods"], "methods")
    variants = _variants(data.get("variants"))
    for m in methods:
        column_for(m, variants)
    ood = None
    if data.get("ood") is not None:
        o = _normalise_keys(data["ood"], "ood")
        extra = sorted(set(o) - {"train_task", "eval_tasks"})
        if extra or "train_task" not in o:
            raise ConfigError("compare: ood needs train_task and eval_tasks (and nothing else)")
        ood = OodSpec(str(o["train_task"]), _str_list(o.get("eval_tasks", []), "ood.eval_tasks"))
    tasks = _str_list(data.get("tasks", []), "tasks", allow_empty=ood is not None)
    seeds = data.get("seeds", [1, 2, 3])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"compare: seeds must be distinct integers >= 0, got {seeds!r}")
    train = _train_keys(data.get("train"), "train")
    for key in ("method_options", "task_options", "eval_split_overrides"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(
                f"compare: {key} must map names to settings, got {type(data[key]).__name__} "
                f"{data[key]!r}"
            )
    method_options = {
        str(m): _train_keys(v, f"method_options.{m}")
        for m, v in (data.get("method_options") or {}).items()
    }
    train_methods = {_method_of(column_for(m, variants).train_method, variants) for m in methods}
    stray = sorted(set(method_options) - train_methods)
    if stray:
        raise ConfigError(
            f"compare: method_options for {stray}, which no listed method trains "
            f"(methods that train: {sorted(train_methods)})"
        )
    # settings given for one method that the method does not read would silently change
    # nothing (method_options: {lora: {prior_std: 0.1}}): refused, unlike the shared ``train``
    for where, method, options in [
        *((f"method_options.{m}", m, o) for m, o in method_options.items()),
        *((f"variants.{v}", b["method"], b) for v, b in variants.items()),
    ]:
        unread = unread_settings(method, options)
        if unread:
            raise ConfigError(
                f"compare: {where} sets {unread}, which method {method!r} does not read "
                "(they would change nothing)"
            )
    task_options = {
        str(t): _train_keys(v, f"task_options.{t}")
        for t, v in (data.get("task_options") or {}).items()
    }
    overrides = data.get("eval_split_overrides") or {}
    if not all(isinstance(v, str) for v in overrides.values()):
        raise ConfigError("compare: eval_split_overrides must map task names to split strings")
    # a task named here but nowhere else (a typo: arc-easy) would silently score the default
    # split, or train with the file's settings
    evaluated = set(tasks) | set(ood.eval_tasks if ood else [])
    for key, named in (("task_options", task_options), ("eval_split_overrides", overrides)):
        stray = sorted(set(map(str, named)) - evaluated)
        if stray:
            raise ConfigError(
                f"compare: {key} names {stray}, which the experiment neither trains on nor "
                f"evaluates (its tasks: {sorted(evaluated)})"
            )
    for task, options in task_options.items():
        training = sorted(set(options) - {"eval_split"})
        if task not in tasks and training:
            raise ConfigError(
                f"compare: task_options.{task} sets {training}, but {task} is only evaluated "
                "(nothing is trained on it): only eval_split applies there"
            )
    run_first = _run_tiers(data.get("run_first", []))
    stray = sorted({m for tier in run_first for m in tier} - set(methods))
    if stray:
        raise ConfigError(f"compare: run_first names {stray}, which are not in methods {methods}")
    if data.get("out") is not None and not (isinstance(data["out"], str) and data["out"].strip()):
        raise ConfigError(f"compare: out must be a folder path, got {data['out']!r}")
    out_path = Path(out) if out else Path(data.get("out") or Path("runs") / "compare" / name)
    spec = CompareSpec(
        name=name,
        out=out_path,
        methods=methods,
        tasks=tasks,
        seeds=list(seeds),
        ood=ood,
        train=train,
        method_options=method_options,
        task_options=task_options,
        eval_split_overrides={str(k): v for k, v in overrides.items()},
        run_first=run_first,
        variants=variants,
    )
    _check_settings(spec)
    return spec


def _variants(data: Any) -> dict[str, dict[str, Any]]:
    """``variants``: each a new column name for a registered ``method`` and its settings."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"compare: variants must be a mapping, got {type(data).__name__}")
    variants = {}
    for name, body in data.items():
        name = str(name)
        if name in METHODS or name.endswith(MEAN_SUFFIX):
            raise ConfigError(
                f"compare: variant {name!r} may not be a method's name or end in {MEAN_SUFFIX!r}"
            )
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            raise ConfigError(
                f"compare: variant {name!r} needs 'method: <one of {sorted(METHODS)}>' "
                "and the settings it changes"
            )
        method = body["method"]
        if method not in METHODS:
            raise ConfigError(
                f"compare: variant {name!r}: unknown method {method!r}; known: {sorted(METHODS)}"
            )
        rest = {k: v for k, v in body.items() if k != "method"}
        variants[name] = {"method": method, **_train_keys(rest, f"variants.{name}")}
    return variants


def _check_settings(spec: CompareSpec) -> None:
    """Build every run's TrainConfig once, so a bad value fails before hours of training; and
    refuse tasks whose runs or evaluations would share a folder."""
    tasks = [*spec.train_tasks, *(spec.ood.eval_tasks if spec.ood else [])]
    check_distinct_dirs(tasks, "compare")
    for task in spec.train_tasks:
        for method in spec.train_methods:
            TrainConfig.from_dict(spec.run_settings(task, method, spec.seeds[0], Path("x")))


def load_spec(path: str | Path, out: str | Path | None = None) -> CompareSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    return spec_from_dict(data or {}, name=path.stem, out=out)
