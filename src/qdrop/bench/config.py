"""Sweep configurations for `qdrop bench`: load a YAML file, validate it, expand it into runs.

Schema (every key below is checked; anything else is an error that names the key)::

    name: cifar10                 # required: the sweep's name
    description: ...              # optional, free text
    out: runs/bench/cifar10       # results folder (relative to the working directory); --out overrides
    defaults:                     # settings shared by every run (any RUN key)
      data: ../shared/data/cifar10
      iters: 2000
    grid:                         # required: RUN key -> list of values; the runs are the cross product
      model: [cifar10_resnet20, cifar10_resnet32]
      bits: [w4a4, w2a4]
      algo: [naive, qdrop]
      seed: [0, 1, 2]
    overrides:                    # optional: settings for the runs that match (applied in order)
      - match: {model: torchvision:mobilenet_v2}
        set: {lam: 0.1}
    exclude:                      # optional: runs to leave out of the product
      - {algo: naive, seed: 1}

A value may be a scalar or a list of alternatives (`match: {algo: [brecq, qdrop]}`).
`${VAR}` and `${VAR:-default}` in string values are read from the environment.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError, UsageError
from ..pipeline import QuantizeJob

TOP_KEYS = ("name", "description", "out", "defaults", "grid", "overrides", "exclude")

# Keys of one vision run: the fields of qdrop's QuantizeJob (with a sweep's own defaults for bits and
# leaf_modules), plus how the runner executes it: threads, keep_checkpoint and deploy (score the
# finished run in a runtime as well).
VISION_KEYS = {
    **{f.name: None if f.default is MISSING else f.default for f in fields(QuantizeJob)},
    "bits": "w4a4", "leaf_modules": [], "threads": None, "keep_checkpoint": True, "deploy": None,
}
# deploy: the runtimes a finished vision run can be exported to and scored in.
DEPLOY_RUNTIMES = ("onnxruntime",)
# Keys of one transformer run, for qdrop.nlp_pipeline.run_nlp_quantize(model, task, data, bits, algo, out, calib, seed, ...):
# these, plus every other argument of that function once it exists (its defaults win), see nlp_keys().
NLP_KEYS = {
    "model": None, "task": None, "bits": "w8a8", "algo": "naive", "data": None, "calib": 256, "seed": 0,
    "threads": None, "keep_checkpoint": True,
}
# arguments of run_nlp_quantize that the runner itself supplies
NLP_RUNNER_ARGS = ("out", "progress", "fp")


def nlp_keys() -> dict:
    """Settings of a transformer run with their defaults: NLP_KEYS plus run_nlp_quantize's arguments."""
    import inspect

    from ..nlp_pipeline import run_nlp_quantize

    keys = dict(NLP_KEYS)
    for name, p in inspect.signature(run_nlp_quantize).parameters.items():
        if name in NLP_RUNNER_ARGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        keys[name] = keys.get(name) if p.default is p.empty else p.default
    return keys


def nlp_choices() -> tuple[tuple, tuple]:
    """(tasks, algorithms) of the transformer path."""
    from ..nlp.models import TASKS
    from ..nlp_pipeline import TRANSFORMER_ALGOS

    return tuple(TASKS), tuple(TRANSFORMER_ALGOS)


def run_keys() -> list[str]:
    return sorted(set(VISION_KEYS) | set(nlp_keys()))


# Keys that change how a run is executed but not its result: not part of the run id. (deploy adds
# a measurement to the record; the quantized model is the same.)
NOT_IN_ID = ("threads", "keep_checkpoint", "deploy")
# The keys every table groups by; the report splits tables on any other key that varies.
CORE_KEYS = ("model", "bits", "algo", "seed")


@dataclass
class Run:
    run_id: str
    config: dict  # the resolved settings (every key of VISION_KEYS or NLP_KEYS)
    kind: str  # "vision" | "nlp"

    def label(self) -> str:
        c = self.config
        extra = f" task={c['task']}" if self.kind == "nlp" else ""
        return f"{c['model']} {c['bits']} {c['algo']} seed={c['seed']}{extra}"


@dataclass
class Sweep:
    name: str
    out: str | None
    config: dict  # the normalised config (what the hash is taken over)
    runs: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    source: str | None = None

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def config_hash(config: dict) -> str:
    """What a results folder is claimed by. Runner-only keys (NOT_IN_ID: threads, keep_checkpoint, deploy)
    are left out, as they are of run ids: resuming a sweep with `--set threads=2` is the same sweep."""
    body = {k: v for k, v in config.items() if k in ("name", "defaults", "grid", "overrides", "exclude")}
    for key in ("defaults", "grid"):
        if isinstance(body.get(key), dict):
            body[key] = {k: v for k, v in body[key].items() if k not in NOT_IN_ID}
    if isinstance(body.get("overrides"), list):
        body["overrides"] = [dict(o, set={k: v for k, v in o["set"].items() if k not in NOT_IN_ID})
                             if isinstance(o, dict) and isinstance(o.get("set"), dict) else o for o in body["overrides"]]
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_sweep(claim: dict, sweep_hash: str) -> bool:
    """Whether a results folder's sweep.json (`claim`) was written by the sweep whose hash is `sweep_hash`.
    Folders claimed before runner-only keys left the hash hold the older hash: their stored config is
    hashed again."""
    if claim.get("config_hash") == sweep_hash:
        return True
    return isinstance(claim.get("config"), dict) and config_hash(claim["config"]) == sweep_hash


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value, where: str, warnings: list):
    if isinstance(value, str):
        def sub(m):
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            warnings.append(f"{where}: environment variable {name} is not set")
            return m.group(0)
        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v, where, warnings) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}", warnings) for k, v in value.items()}
    return value


def is_nlp(settings: dict) -> bool:
    """A transformer run: a `task` key or an hf: model."""
    from ..api import is_transformer_spec

    return settings.get("task") is not None or is_transformer_spec(settings.get("model"))


def parse_assignments(items, what: str) -> dict:
    """['iters=500', 'model=a|b'] -> {'iters': 500, 'model': ['a', 'b']} (values read as YAML scalars)."""
    import yaml

    out = {}
    for item in items or ():
        for part in [p for p in str(item).split(",") if p.strip()]:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"{what}: expected KEY=VALUE, got {part!r}")
            try:
                values = [yaml.safe_load(v.strip()) if v.strip() else None for v in value.split("|")]
            except yaml.YAMLError as err:
                raise ConfigError(f"{what}: {part!r} is not a valid YAML value ({str(err).splitlines()[0]})") from None
            out[key] = values if len(values) > 1 else values[0]
    return out


def load_config(path: str | Path, set_values: dict | None = None) -> dict:
    """Read a sweep YAML file (no validation). `set_values` replace keys of `defaults`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping with keys {', '.join(TOP_KEYS)}")
    if set_values:
        raw = copy.deepcopy(raw)
        defaults = raw.setdefault("defaults", {}) or {}
        if not isinstance(defaults, dict):
            raise ConfigError(f"{path}: 'defaults' must be a mapping")
        for k, v in set_values.items():
            if k in (raw.get("grid") or {}):
                raw["grid"][k] = v if isinstance(v, list) else [v]
            else:
                defaults[k] = v
        raw["defaults"] = defaults
    return raw


def build_sweep(raw: dict, source: str | None = None, check_models: bool = True) -> Sweep:
    """Validate a config dict and expand it into runs. Raises ConfigError naming the bad key."""
    where = source or "config"
    warnings: list = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' is required (a non-empty string)")
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(f"{where}: 'out' must be a folder path (a string)")
    defaults = raw.get("defaults") or {}
    grid = raw.get("grid")
    overrides = raw.get("overrides") or []
    exclude = raw.get("exclude") or []
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: 'defaults' must be a mapping of run settings")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: 'grid' is required: a mapping of run settings to lists of values")
    if not isinstance(overrides, list):
        raise ConfigError(f"{where}: 'overrides' must be a list of {{match: {{...}}, set: {{...}}}}")
    if not isinstance(exclude, list):
        raise ConfigError(f"{where}: 'exclude' must be a list of mappings")

    valid = run_keys()

    def check_keys(mapping: dict, section: str):
        for k in mapping:
            if k not in valid:
                hint = ""
                near = [r for r in valid if r.replace("_", "") == str(k).replace("_", "").replace("-", "").lower()]
                if near:
                    hint = f" (did you mean {near[0]!r}?)"
                raise ConfigError(f"{where}: unknown key {k!r} in {section}{hint}; valid run keys: {', '.join(valid)}")

    check_keys(defaults, "defaults")
    check_keys(grid, "grid")
    norm_grid = {}
    for k, v in grid.items():
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ConfigError(f"{where}: grid.{k} is an empty list")
        norm_grid[k] = values
    for i, o in enumerate(overrides):
        if not isinstance(o, dict) or set(o) - {"match", "set"} or not isinstance(o.get("set"), dict):
            raise ConfigError(f"{where}: overrides[{i}] must be {{match: {{KEY: VALUE}}, set: {{KEY: VALUE}}}}")
        match = o.get("match") or {}
        if not isinstance(match, dict):
            raise ConfigError(f"{where}: overrides[{i}].match must be a mapping")
        check_keys(match, f"overrides[{i}].match")
        check_keys(o["set"], f"overrides[{i}].set")
    for i, e in enumerate(exclude):
        if not isinstance(e, dict) or not e:
            raise ConfigError(f"{where}: exclude[{i}] must be a non-empty mapping")
        check_keys(e, f"exclude[{i}]")

    normalised = dict(name=name, description=raw.get("description"), out=out, defaults=defaults, grid=norm_grid,
                      overrides=overrides, exclude=exclude)
    expanded = _expand_env({"defaults": defaults, "grid": norm_grid, "overrides": overrides, "exclude": exclude},
                           where, warnings)

    keys = list(expanded["grid"])
    runs, seen = [], {}
    for combo in itertools.product(*(expanded["grid"][k] for k in keys)):
        settings = dict(expanded["defaults"])
        settings.update(zip(keys, combo))
        point = dict(settings)
        for o in expanded["overrides"]:
            if _matches(point, o.get("match") or {}):
                settings.update(o["set"])
        if any(_matches(settings, e) for e in expanded["exclude"]):
            continue
        kind = "nlp" if is_nlp(settings) else "vision"
        base = nlp_keys() if kind == "nlp" else VISION_KEYS
        bad = [k for k in settings if k not in base]
        if bad:
            raise ConfigError(f"{where}: key {bad[0]!r} does not apply to {kind} runs "
                              f"(model {settings.get('model')!r}); valid keys: {', '.join(sorted(base))}")
        resolved = {**copy.deepcopy(base), **settings}
        _validate_run(resolved, kind, where)
        run = Run(run_id(resolved), resolved, kind)
        if run.run_id in seen:
            continue  # the same run reached twice (e.g. an override made two grid points equal)
        seen[run.run_id] = run
        runs.append(run)
    if not runs:
        raise ConfigError(f"{where}: the grid produces no runs (everything is excluded)")
    if check_models:
        _check_models(runs, where)
    return Sweep(name=name, out=out, config=normalised, runs=runs, warnings=warnings, source=source)


def _as_list(v):
    return v if isinstance(v, list) else [v]


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if a is None or b is None:
        return a is b
    return str(a) == str(b)


def _matches(settings: dict, match: dict) -> bool:
    return all(any(_same(settings.get(k), v) for v in _as_list(want)) for k, want in match.items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_")[:40] or "x"


# Keys added after results were recorded: they enter the id only when set, so that finished runs
# keep their ids. None = the preset's default, which for these keys is what those runs used, with
# one exception: runs of the onnxruntime preset recorded before x86 targets existed had full int8
# weights (today's target_cpu: vnni), while None now means avx2; no shipped sweep used that preset,
# and such a results folder should be rerun in a new folder.
ID_IF_SET = {"int32_bias", "target_cpu", "budget", "sensitivity", "lr_iters", "init", "units", "recon_loss",
             "split_blocks", "onnx", "rotate", "keep_fp", "w_rounding",
             "gptq_calib", "gptq_damp", "gptq_search", "calib_batch", "e2e_steps", "e2e_lr"}


def run_id(config: dict) -> str:
    """A stable, readable id: model-bits-algo-seed-<hash of every result-relevant setting>."""
    body = {k: v for k, v in config.items() if k not in NOT_IN_ID and not (k in ID_IF_SET and v is None)}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:8]
    task = f"-{config['task']}" if config.get("task") else ""
    return f"{_slug(config['model'])}{task}-{str(config['bits']).lower()}-{config['algo']}-s{config['seed']}-{digest}"


def job_of(config: dict) -> QuantizeJob:
    """The QuantizeJob a vision run's resolved settings describe."""
    job = {f.name: config[f.name] for f in fields(QuantizeJob)}
    return QuantizeJob(**dict(job, leaf_modules=tuple(job["leaf_modules"])))


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _validate_run(c: dict, kind: str, where: str) -> None:
    from ..quant.scheme import parse_bits, parse_mixed_bits

    def bad(key, why):
        raise ConfigError(f"{where}: {key}={c.get(key)!r} is invalid: {why}")

    if not isinstance(c["model"], str) or not c["model"]:
        bad("model", "every run needs a model name (set it in grid or defaults)")
    if not isinstance(c["bits"], str):
        bad("bits", "expected a string like w4a4")
    try:  # vision runs may take fractional weight bits (mixed precision, an average-bits budget)
        parse_bits(c["bits"]) if kind == "nlp" else parse_mixed_bits(c["bits"])
    except ValueError as err:
        bad("bits", str(err))
    c["bits"] = c["bits"].lower()
    if not isinstance(c["seed"], int) or isinstance(c["seed"], bool) or c["seed"] < 0:
        bad("seed", "expected an integer >= 0")
    for key in ("calib",):
        if not _positive_int(c[key]):
            bad(key, "expected a positive integer")
    for key in ("eval_limit", "threads"):
        if c.get(key) is not None and not _positive_int(c[key]):
            bad(key, "expected a positive integer or null")
    if c.get("device") is not None and not (isinstance(c["device"], str) and re.fullmatch(r"cpu|cuda(:\d+)?|mps", c["device"])):
        bad("device", "expected cpu, cuda, cuda:N or null (automatic)")
    if not isinstance(c["keep_checkpoint"], bool):
        bad("keep_checkpoint", "expected true or false")
    if c["data"] is not None and not isinstance(c["data"], str):
        bad("data", "expected a path (string) or null")

    if kind == "nlp":
        tasks, algos = nlp_choices()
        if c["task"] not in tasks:
            bad("task", f"expected one of {', '.join(tasks)}")
        if c["algo"] not in algos:
            bad("algo", f"unknown algorithm for transformer runs; choose from {', '.join(algos)}")
        return

    try:  # the mixed-precision settings, as QuantizeJob itself checks them
        QuantizeJob(c["model"], c["bits"], budget=c["budget"], sensitivity=c["sensitivity"]).check()
    except UsageError as err:
        bad("bits" if c["budget"] is None else "budget", str(err))
    from ..graph.prepare import PRESETS
    from ..recon.configs import RESEARCH_ALGOS
    from ..quant.observers import OBSERVERS

    if c["algo"] not in RESEARCH_ALGOS:
        bad("algo", f"unknown algorithm; choose from {', '.join(RESEARCH_ALGOS)}")
    if c["backend"] not in PRESETS:
        bad("backend", f"unknown backend preset; choose from {', '.join(sorted(PRESETS))}")
    for key in ("iters", "batch_size"):
        if not _positive_int(c[key]):
            bad(key, "expected a positive integer")
    if c["algo"] != "naive" and c["calib"] < c["batch_size"]:
        bad("calib", f"reconstruction needs at least batch_size={c['batch_size']} calibration samples")
    if c["algo"] == "naive":
        c["iters"] = 0  # naive PTQ has no iterations: one run, whatever the iteration count
    if c["lam"] is not None and (isinstance(c["lam"], bool) or not isinstance(c["lam"], (int, float)) or c["lam"] < 0):
        bad("lam", "expected a number >= 0 or null (from the architecture)")
    if c["max_cache_mb"] is not None and not _positive_int(c["max_cache_mb"]):
        bad("max_cache_mb", "expected a positive integer or null")
    for key in ("w_observer", "a_observer"):
        if c[key] is not None and c[key] not in OBSERVERS:
            bad(key, f"unknown observer; choose from {', '.join(sorted(OBSERVERS))}")
    for key in ("compile", "pretrained"):
        if not isinstance(c[key], bool):
            bad(key, "expected true or false")
    if c["int32_bias"] is not None and not isinstance(c["int32_bias"], bool):
        bad("int32_bias", "expected true, false or null (the preset's choice)")
    if c["target_cpu"] is not None:
        targets = PRESETS[c["backend"]].target_cpus
        if not targets:
            with_targets = [name for name, p in sorted(PRESETS.items()) if p.target_cpus]
            bad("target_cpu", f"backend {c['backend']!r} has no CPU targets (only {', '.join(with_targets)})")
        if c["target_cpu"] not in targets:
            bad("target_cpu", f"expected {', '.join(targets)} or null (the preset's default, {targets[0]})")
    if c["deploy"] is not None and c["deploy"] not in DEPLOY_RUNTIMES:
        bad("deploy", f"expected {' or '.join(DEPLOY_RUNTIMES)} or null (no deployment)")
    if isinstance(c["leaf_modules"], str):
        c["leaf_modules"] = [c["leaf_modules"]]
    if not isinstance(c["leaf_modules"], list) or not all(isinstance(x, str) for x in c["leaf_modules"]):
        bad("leaf_modules", "expected a list of module names")
    if c["weights"] is not None:
        if not isinstance(c["weights"], str):
            bad("weights", "expected a state_dict file path or null")


def _check_models(runs: list, where: str) -> None:
    """Every vision model name must be one the zoo knows: build each once with random weights
    (no download, no data), so a typo fails here and not hours into a sweep."""
    from ..models import ModelError, load_model

    checked = {}
    for run in runs:
        if run.kind != "vision":
            continue
        name = run.config["model"]
        if name in checked:
            continue
        try:
            load_model(name, pretrained=False)
        except ModelError as err:
            raise ConfigError(f"{where}: model={name!r} is invalid: {err}") from None
        except Exception as err:  # a user factory that fails
            raise ConfigError(f"{where}: model={name!r} cannot be built: {type(err).__name__}: {err}") from None
        checked[name] = True


def load_sweep(path: str | Path, set_values: dict | None = None) -> Sweep:
    raw = load_config(path, set_values)
    return build_sweep(raw, source=str(path))


def check_paths(runs: list, where: str | None = None) -> None:
    """Before a real run: every data folder and weights file the runs name must exist."""
    where = where or "config"
    for run in runs:
        c = run.config
        for key in ("data", "weights"):
            value = c.get(key)
            if value is not None and not Path(value).expanduser().exists():
                unset = " (an environment variable in it is not set)" if "${" in value else ""
                raise ConfigError(f"{where}: {key}={value!r} does not exist{unset} (run {run.run_id})")


def filter_runs(runs: list, only: dict | None) -> list:
    """Keep the runs whose settings match every KEY=VALUE(|VALUE...) of `only`."""
    if not only:
        return list(runs)
    valid = run_keys()
    for k in only:
        if k not in valid:
            raise ConfigError(f"--only: unknown key {k!r}; valid run keys: {', '.join(valid)}")
    kept = [r for r in runs if _matches(r.config, only)]
    if not kept:
        values = {k: sorted({str(r.config.get(k)) for r in runs}) for k in only}
        raise ConfigError(f"--only {only} matches no run of this sweep; values here: {values}")
    return kept
