"""qdrop bench / report / analyze: config validation, resume, failures, report layout, analysis.

Most tests use a tiny CNN (a module: factory) on a generated ImageFolder, so they need no
download and no shared data; the accuracies they produce are meaningless and never asserted.
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qdrop.bench import ConfigError, SweepRefused, bench_main, read_results, render_report, run_sweep
from qdrop.bench.config import build_sweep, load_sweep
from qdrop.io import torch_threads

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CIFAR = SHARED / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "test.npz").exists(), reason="needs ../shared/data/cifar10")
# plots are optional (matplotlib): the report and analysis tables are written regardless
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None

TINY_MODEL = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv(x)) + x[:, :, ::2, ::2]
        return self.fc(torch.flatten(self.pool(x), 1))

def make():
    torch.manual_seed(0)
    return Tiny().eval(), {"dataset": "imagefolder", "preprocess": "imagenet", "num_classes": 3}
'''


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("QDROP_OFFLINE", "1")
    monkeypatch.setenv("QDROP_CACHE", str(tmp_path_factory.mktemp("cache")))
    with torch_threads(1):
        yield


def make_imagefolder(root: Path, classes=3, per_class=8, size=40, seed=0) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png with random pixels (the ImageNet layout)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)
                pixels[..., c] = np.clip(pixels[..., c].astype(int) + 80, 0, 255)  # a little class signal
                Image.fromarray(pixels).save(d / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    data = make_imagefolder(base / "imagenet")
    model_file = base / "tiny_model.py"
    model_file.write_text(TINY_MODEL)
    return dict(data=str(data), model=f"module:{model_file}:make", base=base)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_config(tiny, out, **grid):
    return dict(name="tiny", out=str(out),
                defaults=dict(model=tiny["model"], data=tiny["data"], calib=8, batch_size=4, iters=2, eval_limit=12),
                grid=dict(dict(bits=["w4a4"], algo=["naive", "qdrop"], seed=[0]), **grid))


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.update(colour="red"), "colour"),
    (lambda c: c["defaults"].update(itres=5), "itres"),
    (lambda c: c["grid"].update(lamda=[0.1]), "lamda"),
    (lambda c: c.update(overrides=[{"match": {"modle": "x"}, "set": {"lam": 1}}]), "modle"),
])
def test_unknown_key_is_named(tmp_path, tiny, capsys, mutate, key):
    cfg = tiny_config(tiny, tmp_path / "out")
    mutate(cfg)
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_sweep(path)
    assert bench_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and err.startswith("qdrop: error:")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("key, value, words", [
    ("model", "resnet_nonsense", ["model='resnet_nonsense'", "unknown model"]),
    ("model", "torchvision:resnet_nope", ["model='torchvision:resnet_nope'"]),
    ("algo", "adaroundd", ["algo='adaroundd'", "qdrop"]),
    ("bits", "w9a4", ["bits='w9a4'"]),
    ("backend", "tensorrtt", ["backend='tensorrtt'"]),
    ("iters", 0, ["iters=0"]),
    ("w_observer", "meansq", ["w_observer='meansq'"]),
])
def test_bad_values_are_named(tmp_path, tiny, key, value, words):
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["grid"][key] = [value]
    with pytest.raises(ConfigError) as e:
        build_sweep(cfg)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("settings, words", [
    (dict(deploy="tensorrt"), ["deploy='tensorrt'", "onnxruntime or null"]),
    (dict(deploy=True), ["deploy=True"]),
    (dict(backend="onnxruntime", target_cpu="avx512"), ["target_cpu='avx512'", "avx2, vnni"]),
    (dict(backend="academic", target_cpu="avx2"), ["target_cpu='avx2'", "'academic' has no CPU targets"]),
])
def test_bad_deploy_and_target_cpu_are_named(tmp_path, tiny, settings, words):
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["defaults"].update(settings)
    with pytest.raises(ConfigError) as e:
        build_sweep(cfg)
    for w in words:
        assert w in str(e.value)


def test_deploy_and_target_cpu_in_run_ids(tmp_path, tiny):
    """deploy adds a measurement, not another model: same id; target_cpu enters the id only when set,
    so that runs recorded before the key existed keep theirs."""
    def ids(**defaults):
        cfg = tiny_config(tiny, tmp_path / "out", algo=["naive"])
        cfg["defaults"].update(backend="onnxruntime", **defaults)
        return [r.run_id for r in build_sweep(cfg).runs]

    plain = ids()
    assert ids(deploy="onnxruntime") == plain and ids(target_cpu=None) == plain
    assert len({*plain, *ids(target_cpu="avx2"), *ids(target_cpu="vnni")}) == 3
    nlp = dict(name="nlp", grid=dict(model=["hf:tiny"], task=["sts"], deploy=["onnxruntime"]))
    with pytest.raises(ConfigError, match="'deploy' does not apply to nlp runs"):
        build_sweep(nlp)


def test_missing_data_refused_before_running(tmp_path, tiny, capsys):
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["defaults"]["data"] = str(tmp_path / "nowhere")
    path = write_config(tmp_path / "c.yaml", cfg)
    assert bench_main([str(path), "--dry-run"]) == 0  # a dry run only lists
    assert bench_main([str(path)]) == 2
    assert "data=" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_overrides_exclude_and_env(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("TINY_DATA", tiny["data"])
    cfg = tiny_config(tiny, tmp_path / "out", bits=["w4a4", "w2a4"], seed=[0, 1])
    cfg["defaults"]["data"] = "${TINY_DATA}"
    cfg["overrides"] = [{"match": {"bits": "w2a4"}, "set": {"lam": 0.1}}]
    cfg["exclude"] = [{"algo": "naive", "seed": 1}]
    sweep = build_sweep(cfg)
    assert len(sweep.runs) == 2 * 2 * 2 - 2
    assert all(r.config["data"] == tiny["data"] for r in sweep.runs)
    assert {r.config["lam"] for r in sweep.runs if r.config["bits"] == "w2a4" and r.config["algo"] == "qdrop"} == {0.1}
    assert all(r.config["iters"] == 0 for r in sweep.runs if r.config["algo"] == "naive")
    assert len({r.run_id for r in sweep.runs}) == len(sweep.runs)


# (deploy_bench's records predate the cuda_graph option, which entered every vision run's id as False: a
# rerun of benchmarks/deploy.yaml recomputes those 24 runs. The sweeps below must not lose theirs again.)
@pytest.mark.parametrize("config, results", [("transformer_recon.yaml", "transformer_recon/sweep"),
                                              ("beyond.yaml", "beyond_bench")])
def test_recorded_runs_keep_their_ids(config, results):
    """A keyword added to the run functions must not change the ids of runs already recorded (they would be
    run again): every shipped record's id is what today's code computes from its config."""
    from qdrop.bench.config import run_id

    records = [json.loads(line) for line in open(ROOT / "benchmarks" / "results" / results / "results.jsonl")]
    sweep = load_sweep(ROOT / "benchmarks" / config, {"threads": records[0]["config"].get("threads")})
    ids = {r.run_id for r in sweep.runs}
    mine = [r for r in records if r.get("sweep") == sweep.name]
    assert mine
    for r in mine:
        assert r["run_id"] == run_id(r["config"])
        assert r["run_id"] in ids, r["run_id"]


def test_shipped_configs_dry_run(capsys, monkeypatch):
    monkeypatch.setenv("IMAGENET", "/data/imagenet")
    configs = [("cifar10", 32), ("imagenet_paper", 96), ("nlp", 24), ("deploy", 24), ("beyond", 88)]
    if importlib.util.find_spec("efficientnet_lite_pytorch"):  # qdrop[vision]: lite0.yaml's model needs it
        configs.append(("lite0", 8))
    for name, n in configs:
        summary = run_sweep(ROOT / "benchmarks" / f"{name}.yaml", dry_run=True, progress=False)
        assert len(summary["runs"]) == n, name
    out = capsys.readouterr().out
    assert "torchvision:mobilenet_v2" in out and "regnet_x_600mf" in out
    paper = load_sweep(ROOT / "benchmarks" / "imagenet_paper.yaml")
    lam = {r.config["model"]: r.config["lam"] for r in paper.runs}
    assert lam["torchvision:resnet18"] == 0.01 and lam["torchvision:mobilenet_v2"] == 0.1 and lam["torchvision:mnasnet1_0"] == 0.2
    assert {r.config["iters"] for r in paper.runs if r.config["algo"] != "naive"} == {20000}
    assert {(r.config["calib"], r.config["batch_size"]) for r in paper.runs} == {(1024, 32)}
    deploy = load_sweep(ROOT / "benchmarks" / "deploy.yaml")
    assert {(r.config["algo"], r.config["bits"], r.config["backend"]) for r in deploy.runs} == {
        (a, b, p) for a in ("naive", "adaround", "brecq", "qdrop") for b in ("w8a8", "w4a8", "w4a4") for p in ("onnxruntime", "qnn")}
    assert {(r.config["model"], r.config["deploy"], r.config["target_cpu"]) for r in deploy.runs} == {
        ("cifar10_resnet20", "onnxruntime", None)}
    # issue #13's ablation: each component alone at W2A4/W2A2 (ResNet-20, seed 0, 2,000 it); qdrop vs qdrop-plus
    # at four bit-widths, 3 seeds on ResNet-20 and one on ResNet-32, and W2A4 at 500 it
    beyond = [r.config for r in load_sweep(ROOT / "benchmarks" / "beyond.yaml").runs]
    components = {c["algo"] for c in beyond} - {"qdrop", "qdrop-plus", "qdrop-plus-fastround", "qdrop-plus-e2e"}
    assert components == {"qdrop-fisher", "qdrop-pd", "qdrop-dc", "qdrop-pdquant", "qdrop-net", "qdrop-mrecg"}
    assert {(c["algo"], c["bits"]) for c in beyond if c["algo"] in components} == {
        (a, b) for a in components for b in ("w2a4", "w2a2")}
    for algo in ("qdrop-plus", "qdrop-plus-fastround", "qdrop-plus-e2e"):
        assert {(c["seed"], c["bits"]) for c in beyond if c["model"] == "cifar10_resnet20" and c["algo"] == algo
                and c["iters"] == 2000} == {(s, b) for s in (0, 1, 2) for b in ("w2a4", "w2a2", "w3a3", "w4a4")}
        assert {(c["seed"], c["bits"]) for c in beyond if c["model"] == "cifar10_resnet32" and c["algo"] == algo} == {
            (0, b) for b in ("w2a4", "w2a2", "w3a3", "w4a4")}
    assert {(c["bits"], c["algo"]) for c in beyond if c["iters"] == 500} == {
        ("w2a4", "qdrop"), ("w2a4", "qdrop-plus"), ("w2a4", "qdrop-plus-fastround"), ("w2a4", "qdrop-plus-e2e")}


def test_dry_run_only_limit(tmp_path, tiny, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "out", bits=["w4a4", "w2a4"]))
    assert bench_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs selected of 4" in out and out.count("pending") == 4
    assert not (tmp_path / "out").exists()
    s = run_sweep(path, dry_run=True, only="bits=w2a4,algo=qdrop|naive", progress=False)
    assert [r.config["bits"] for r in s["runs"]] == ["w2a4", "w2a4"]
    s = run_sweep(path, dry_run=True, limit=3, progress=False)
    assert len(s["plan"]) == 3
    with pytest.raises(ConfigError, match="'colour'"):
        run_sweep(path, dry_run=True, only="colour=red", progress=False)
    with pytest.raises(ConfigError, match="matches no run"):
        run_sweep(path, dry_run=True, only="algo=brecq", progress=False)


# ---- running -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_results(tiny, tmp_path_factory):
    """A finished tiny sweep: naive and qdrop (2 iterations) at W4A4."""
    base = tmp_path_factory.mktemp("sweep")
    path = write_config(base / "tiny.yaml", tiny_config(tiny, base / "results"))
    summary = run_sweep(path, progress=False)
    return dict(path=path, summary=summary, results=base / "results")


def test_sweep_records_and_resume(tiny_results, capsys):
    s = tiny_results["summary"]
    assert s["ran"] == 2 and s["failed"] == 0
    recs = read_results(tiny_results["results"])
    assert [r["status"] for r in recs] == ["ok", "ok"]
    for r in recs:
        for key in ("run_id", "config", "git", "versions", "device", "seconds", "wall_seconds", "peak_memory", "metrics"):
            assert key in r, key
        assert r["git"] is None or set(r["git"]) >= {"commit", "dirty"}
        assert r["versions"]["torch"] == torch.__version__
        assert r["peak_memory"]["rss_bytes"] > 0
        assert {"load", "calibrate", "evaluate"} <= set(r["seconds"])
        assert (tiny_results["results"] / r["out_dir"] / "model.pt").exists()
    naive, qd = recs
    assert naive["units"] is None and naive["metrics"]["iters"] == 0
    assert qd["units"] and all(u["curve"] and u["iters"] == 2 for u in qd["units"])
    assert "reconstruct" in qd["seconds"]
    assert qd["fp_reused"] and qd["metrics"]["fp"] == naive["metrics"]["fp"]  # FP evaluated once per model
    sweep = json.loads((tiny_results["results"] / "sweep.json").read_text())
    assert sweep["config_hash"] == s["config_hash"]
    # resume: a second invocation runs nothing
    assert bench_main([str(tiny_results["path"]), "--no-progress"]) == 0
    assert "0 ran (0 failed), 2 already done" in capsys.readouterr().out
    assert len(read_results(tiny_results["results"])) == 2



def test_a_run_whose_algorithm_changed_since_runs_again(tiny, tmp_path, monkeypatch, capsys):
    """The run id hashes the algorithm's name, not what the name runs: a finished run records its algorithm's
    definition, and once that definition changes the run is stale and runs again (only it); a definition that
    gained an option at its default, or a record from before definitions were kept, stays current."""
    import dataclasses

    from qdrop.recon import configs

    path = write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "out"))
    assert run_sweep(path, progress=False)["ran"] == 2
    naive, qd = read_results(tmp_path / "out")
    assert "algorithm" not in naive and qd["algorithm"] == configs.definition("qdrop")
    assert qd["algorithm"]["algorithm"]["stages"][0]["drop_prob"] == 0.5
    assert run_sweep(path, progress=False)["ran"] == 0
    # qdrop's definition changes: its run is stale, the naive run is not
    old = configs.ALGORITHMS["qdrop"]
    changed = dataclasses.replace(old, stages=(dataclasses.replace(old.stages[0], drop_prob=0.75),))
    monkeypatch.setitem(configs.ALGORITHMS, "qdrop", changed)
    capsys.readouterr()
    s = run_sweep(path, dry_run=True, progress=False)
    assert list(s["stale"]) == [qd["run_id"]] and s["stale"][qd["run_id"]] == ["algorithm.stages[0].drop_prob: 0.5 -> 0.75"]
    err = capsys.readouterr().err
    assert "1 finished runs (qdrop) were recorded under an earlier definition" in err and "0.5 -> 0.75" in err
    # asked to deploy too, the stale run is quantized again (not only exported from its old model.pt)
    run_sweep(path, dry_run=True, progress=False, set_values=["deploy=onnxruntime"])
    table = {line.split()[1]: line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert table[qd["run_id"]] == "stale" and table[naive["run_id"]] == "deploy"
    report = render_report(tmp_path / "out", plots=False)  # the stale run is out of the tables, and listed
    assert "1 stale" in report and "## Stale runs" in report and f"`{qd['run_id']}` | algorithm.stages[0].drop_prob" in report
    # the old run's metrics.json is not taken for the new run's (a kill's recovery): it runs again
    run_dir = tmp_path / "out" / qd["out_dir"]
    assert json.loads((run_dir / "metrics.json").read_text())["quant"] == qd["metrics"]["quant"]
    s = run_sweep(path, progress=False)
    assert s["ran"] == 1 and s["records"][0]["run_id"] == qd["run_id"] and not s["records"][0].get("recovered")
    assert s["records"][0]["status"] == "ok" and s["records"][0]["algorithm"] == configs.definition("qdrop")
    assert len(read_results(tmp_path / "out")) == 3 and run_sweep(path, progress=False)["ran"] == 0
    assert "stale" not in render_report(tmp_path / "out", plots=False)
    # a rerun killed after its metrics.json, before its results line, is recovered, not run a third time
    again = dataclasses.replace(old, stages=(dataclasses.replace(old.stages[0], drop_prob=0.9),))
    monkeypatch.setitem(configs.ALGORITHMS, "qdrop", again)
    finished = dict(s["records"][0]["metrics"], quant=12.5)
    (run_dir / "metrics.json").write_text(json.dumps(finished))
    s = run_sweep(path, progress=False)
    assert s["ran"] == 1 and s["records"][0].get("recovered") and s["records"][0]["metrics"] == finished
    assert read_results(tmp_path / "out")[-1]["algorithm"] == configs.definition("qdrop")  # the rerun's definition
    # an option added since, at its default, leaves the run current; at another value, it does not
    monkeypatch.setitem(configs.ALGORITHMS, "qdrop", old)
    recorded = configs.definition("qdrop")
    del recorded["algorithm"]["stages"][0]["views"], recorded["algorithm"]["merge"]
    assert configs.definition_changes(recorded, configs.definition("qdrop")) == []
    assert configs.definition_changes(recorded, configs.definition("qdrop-mrecg")) == ["algorithm.name: 'qdrop' -> 'qdrop-mrecg'",
                                                                                      "algorithm.merge: (absent) -> 2"]
    two = configs.definition("qdrop-plus-e2e")
    assert configs.definition_changes(recorded, two)[-1] == "algorithm.stages: 1 -> 2"
    # a record from before definitions were kept: nothing to compare, current
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    del last["algorithm"]
    (tmp_path / "out" / "results.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    monkeypatch.setitem(configs.ALGORITHMS, "qdrop", changed)
    assert run_sweep(path, progress=False)["ran"] == 0


def test_truncated_line_and_recovered_run(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "out"))
    s = run_sweep(path, only="algo=naive", progress=False)
    assert s["ran"] == 1
    results = tmp_path / "out" / "results.jsonl"
    rec = json.loads(results.read_text())
    # a kill after the run's metrics.json but before its results line, mid-write
    results.write_text(results.read_text()[:-40])
    assert read_results(tmp_path / "out") == []
    s = run_sweep(path, only="algo=naive", progress=False)
    assert s["ran"] == 1 and s["records"][0].get("recovered") and s["records"][0]["metrics"] == rec["metrics"]
    recs = read_results(tmp_path / "out")
    assert len(recs) == 1 and recs[0]["run_id"] == rec["run_id"]


def test_failed_run_is_recorded_and_sweep_goes_on(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(tiny, tmp_path / "out", algo=["naive"], data=[str(empty), tiny["data"]])
    path = write_config(tmp_path / "c.yaml", cfg)
    assert bench_main([str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "1 ran (1 failed)" not in out and "2 ran (1 failed)" in out
    recs = read_results(tmp_path / "out")
    failed, ok = recs
    assert failed["status"] == "failed" and "DataError" in failed["error"]["type"] and "no images" in failed["error"]["message"]
    assert "Traceback" in failed["error"]["traceback"]
    assert ok["status"] == "ok"
    # the next invocation retries only the failed run
    s = run_sweep(path, progress=False)
    assert s["ran"] == 1 and s["failed"] == 1 and s["skipped"] == 1


def test_other_config_refused_without_force(tiny, tiny_results, tmp_path, capsys):
    cfg = tiny_config(tiny, tiny_results["results"], bits=["w2a4"])
    path = write_config(tmp_path / "other.yaml", cfg)
    with pytest.raises(SweepRefused, match="--force"):
        run_sweep(path, progress=False, limit=0)
    assert bench_main([str(path), "--limit", "0"]) == 2
    assert "another sweep config" in capsys.readouterr().err
    s = run_sweep(path, progress=False, limit=0, force=True)
    assert s["ran"] == 0
    sweep = json.loads((tiny_results["results"] / "sweep.json").read_text())
    assert sweep["config_hash"] == s["config_hash"] and sweep["history"]
    # restore the fixture's claim for the other tests
    run_sweep(tiny_results["path"], progress=False, force=True)


def test_runner_only_keys_resume_the_same_sweep(tiny_results, capsys):
    """--set threads=... (or keep_checkpoint, deploy) is the same sweep: it resumes the folder, where a
    result-relevant --set is refused; a folder claimed with the older hash (runner-only keys in it) is
    recognised by its stored config."""
    path, results = tiny_results["path"], tiny_results["results"]
    s = run_sweep(path, progress=False, set_values={"threads": 1})
    assert s["ran"] == 0 and s["config_hash"] == tiny_results["summary"]["config_hash"]
    with pytest.raises(SweepRefused, match="--force"):
        run_sweep(path, progress=False, limit=0, set_values={"iters": 3})
    claim_path = results / "sweep.json"
    claim = json.loads(claim_path.read_text())
    try:
        legacy = dict(claim, config_hash="0123456789abcdef",
                      config=dict(claim["config"], defaults=dict(claim["config"]["defaults"], threads=2)))
        claim_path.write_text(json.dumps(legacy))
        assert run_sweep(path, progress=False)["ran"] == 0
        assert json.loads(claim_path.read_text())["config_hash"] == "0123456789abcdef"  # not rewritten
    finally:
        claim_path.write_text(json.dumps(claim))


def test_random_weight_torchvision_imagefolder_end_to_end(tiny, tmp_path):
    """The imagenet_paper.yaml kind of run (torchvision model, ImageFolder train/val, per-family lambda),
    on random weights, a generated image folder and 2 iterations."""
    paper = yaml.safe_load((ROOT / "benchmarks" / "imagenet_paper.yaml").read_text())
    cfg = dict(name="paper_small", out=str(tmp_path / "out"),
               defaults={**paper["defaults"], "data": tiny["data"], "calib": 8, "batch_size": 4, "iters": 2,
                         "pretrained": False, "eval_limit": 6},
               grid=dict(model=["torchvision:mnasnet0_5"], bits=["w4a4"], algo=["qdrop"], seed=[0]),
               overrides=[{"match": {"model": "torchvision:mnasnet0_5"}, "set": {"lam": 0.2}}])
    path = write_config(tmp_path / "c.yaml", cfg)
    s = run_sweep(path, progress=False)
    assert s["failed"] == 0, s["records"][0].get("error")
    rec = s["records"][0]
    assert rec["metrics"]["lam"] == 0.2 and rec["metrics"]["eval_size"] == 6
    assert "train" in rec["data_used"]["calib_data"] and "val" in rec["data_used"]["eval_data"]
    assert len(rec["units"]) > 5


def test_nlp_runs_dispatch_lazily(tmp_path, monkeypatch):
    cfg = dict(name="nlp", out=str(tmp_path / "out"),
               grid=dict(model=["hf:tiny"], task=["sts"], bits=["w8a8"], algo=["naive", "osplus"], seed=[0]))
    path = write_config(tmp_path / "c.yaml", cfg)
    import qdrop.nlp_pipeline

    calls = []

    def fake(model, task, data, bits, algo, out, calib, seed):
        calls.append((model, task, bits, algo, calib, seed, Path(out).is_dir()))
        return dict(metric="spearman", fp=80.0, quant=79.0, seconds={"calibrate": 0.1})

    monkeypatch.setattr(qdrop.nlp_pipeline, "run_nlp_quantize", fake)
    s = run_sweep(path, progress=False)
    assert s["ran"] == 2 and s["failed"] == 0
    assert calls[0] == ("hf:tiny", "sts", "w8a8", "naive", 256, 0, True)
    assert s["records"][1]["fp_reused"] is False  # the fake takes no fp= argument
    build_sweep(dict(cfg, grid=dict(cfg["grid"], algo=["qdrop"])))  # block reconstruction takes transformers too
    bad = dict(cfg, grid=dict(cfg["grid"], algo=["nope"]))
    with pytest.raises(ConfigError, match="algo='nope'"):
        build_sweep(bad)


@needs_cifar
def test_resume_skips_finished_runs_real_cifar(tmp_path):
    """cifar10_resnet20 naive on the shared data: --limit 1 runs one, the rerun runs only the other."""
    cfg = dict(name="r20_naive", out=str(tmp_path / "out"),
               defaults=dict(model="cifar10_resnet20", data=str(CIFAR), algo="naive", calib=64, eval_limit=200),
               grid=dict(bits=["w4a4", "w8a8"], seed=[0]))
    path = write_config(tmp_path / "c.yaml", cfg)
    assert bench_main([str(path), "--limit", "1", "--no-progress"]) == 0
    first = read_results(tmp_path / "out")
    assert len(first) == 1 and first[0]["config"]["bits"] == "w4a4"
    s = run_sweep(path, progress=False)
    assert s["ran"] == 1 and s["skipped"] == 1
    recs = read_results(tmp_path / "out")
    assert [r["config"]["bits"] for r in recs] == ["w4a4", "w8a8"]
    assert 70 < recs[0]["metrics"]["fp"] < 90 and recs[0]["metrics"]["eval_size"] == 200
    assert recs[1]["fp_reused"] and recs[1]["metrics"]["fp"] == recs[0]["metrics"]["fp"]
    assert run_sweep(path, progress=False)["ran"] == 0


def test_deploy_failure_keeps_the_simulated_result(tiny, tmp_path, monkeypatch, capsys):
    """An export or ONNX Runtime error becomes deploy.error in an ok record; the checkpoint stays
    (keep_checkpoint: false notwithstanding) and the next invocation deploys again, without quantizing."""
    import qdrop.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX Runtime here\nsecond line")

    monkeypatch.setattr(qdrop.pipeline, "run_export", broken)
    cfg = tiny_config(tiny, tmp_path / "out", algo=["naive"])
    cfg["defaults"].update(deploy="onnxruntime", keep_checkpoint=False)
    path = write_config(tmp_path / "c.yaml", cfg)
    assert bench_main([str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "deploy FAILED: RuntimeError: no ONNX Runtime here" in out and "1 deployments failed" in out
    (rec,) = read_results(tmp_path / "out")
    assert rec["status"] == "ok" and rec["metrics"]["quant"] is not None
    assert rec["deploy"]["error"] == "RuntimeError: no ONNX Runtime here" and rec["deploy"]["runtime"] == "onnxruntime"
    run_dir = tmp_path / "out" / rec["out_dir"]
    assert (run_dir / "model.pt").exists()
    run_sweep(path, dry_run=True, progress=False)
    assert "only to deploy" in capsys.readouterr().out

    calls = []

    def fake(checkpoint, out, **kwargs):
        calls.append(kwargs)
        Path(out).write_bytes(b"onnx")
        return dict(target_cpu=None, low_bit_container="int8",
                    parity=dict(samples=12, agreement=100.0, sim_top1=50.0, ort_top1=50.0, max_abs_diff=0.0,
                                integer_nodes={"QLinearConv": 2, "QGemm": 1}, integer_node_total=3,
                                optimized_ops={"QLinearConv": 2, "QGemm": 1, "QuantizeLinear": 1}, cpu={"vnni": True}))

    monkeypatch.setattr(qdrop.pipeline, "run_export", fake)
    monkeypatch.setattr("qdrop.bench.runner.ort_latency", lambda path, c: dict(b1_ms=1.0, b32_ms=2.0))
    s = run_sweep(path, progress=False)
    assert s["ran"] == 0 and s["deployed"] == 1 and s["deploy_failed"] == 0
    assert calls[0]["eval_limit"] == 12 and calls[0]["check_data"] == tiny["data"]
    new = read_results(tmp_path / "out")[-1]
    assert new["metrics"] == rec["metrics"] and new["started"] == rec["started"]  # the same run, deployed
    assert new["deploy"]["kernels"] == "integer" and new["deploy"]["deployed_top1"] == 50.0
    assert not (run_dir / "model.pt").exists() and not (run_dir / "model.onnx").exists()  # keep_checkpoint: false
    assert run_sweep(path, progress=False)["deployed"] == 0
    # a run recorded without deployment whose checkpoint is gone stays as recorded (it is not quantized again)
    with open(tmp_path / "out" / "results.jsonl", "a") as f:
        f.write(json.dumps({k: v for k, v in new.items() if k != "deploy"}) + "\n")
    capsys.readouterr()
    run_sweep(path, dry_run=True, progress=False)
    assert "done, no model.pt to deploy" in capsys.readouterr().out
    s = run_sweep(path, progress=False)
    assert s["ran"] == s["deployed"] == 0 and s["skipped"] == 1
    assert "cannot be deployed: their model.pt was deleted" in capsys.readouterr().err


def test_kernel_kind():
    from qdrop.bench.runner import kernel_kind

    integer = {"QLinearConv": 19, "QGemm": 1, "QLinearAdd": 9}
    assert kernel_kind({**integer, "QuantizeLinear": 1}, integer) == (0, "integer")
    assert kernel_kind({**integer, "Conv": 2, "FusedConv": 1}, integer) == (3, "mixed")
    # integer adds and pooling, but every layer dequantized to float
    assert kernel_kind({"QLinearAdd": 9, "FusedConv": 19, "Gemm": 1}, {"QLinearAdd": 9}) == (20, "float")


@needs_cifar
def test_deploy_onnxruntime_real_cifar(tmp_path, capsys):
    """cifar10_resnet20 W8A8 (onnxruntime preset, naive) on the shared data, deployed in ONNX Runtime."""
    from qdrop.bench import report_main

    cfg = dict(name="r20_deploy", out=str(tmp_path / "out"),
               defaults=dict(model="cifar10_resnet20", data=str(CIFAR), backend="onnxruntime", deploy="onnxruntime",
                             calib=64, eval_limit=200, threads=2, device="cpu"),  # CPU: the simulation parity uses
               grid=dict(bits=["w8a8"], algo=["naive"]))
    path = write_config(tmp_path / "c.yaml", cfg)
    s = run_sweep(path, progress=False)
    assert s["failed"] == 0 and s["deploy_failed"] == 0, s["records"][0].get("error") or s["records"][0].get("deploy")
    rec = read_results(tmp_path / "out")[0]
    dep = rec["deploy"]
    assert dep["runtime"] == "onnxruntime" and dep["samples"] == 200 and dep["target_cpu"] == "avx2"
    assert dep["agreement"] >= 99 and dep["integer_node_total"] > 0 and dep["integer_nodes"]["QLinearConv"] == 19
    assert dep["kernels"] == "integer" and dep["float_compute_nodes"] == 0
    assert dep["sim_top1"] == rec["metrics"]["quant"] and abs(dep["deployed_top1"] - dep["sim_top1"]) <= 1
    assert 0 < dep["latency_ms"]["b1_ms"] < dep["latency_ms"]["b32_ms"] and dep["latency_ms"]["threads"] == 2
    assert isinstance(dep["cpu"]["vnni"], bool) and dep["ort_version"]
    run_dir = tmp_path / "out" / rec["out_dir"]
    assert (run_dir / "model.onnx").exists() and (run_dir / "parity.json").exists()
    assert report_main([str(tmp_path / "out"), "--no-plots", "--print"]) == 0
    md = capsys.readouterr().out
    assert "deployed top-1 (ORT)" in md
    row = next(line for line in md.splitlines() if line.startswith("| `cifar10_resnet20` | 8/8 | naive | onnxruntime / avx2"))
    assert f"| {rec['metrics']['quant']:.2f} | {dep['deployed_top1']:.2f} | {dep['agreement']:.2f} | integer |" in row


# ---- report -------------------------------------------------------------------------------

def fake_record(model, bits, algo, seed, quant, fp, iters=100, status="ok"):
    """A hand-made results line for testing the renderer (these numbers are invented)."""
    config = dict(model=model, bits=bits, algo=algo, seed=seed, iters=0 if algo == "naive" else iters, calib=1024,
                  backend="academic", eval_limit=None, lam=None, data="x")
    rec = dict(schema=1, run_id=f"{model}-{bits}-{algo}-{seed}-{iters}", kind="vision", status=status, config=config,
               wall_seconds=10.0, seconds=dict(calibrate=1.0, evaluate=2.0, **({} if algo == "naive" else dict(reconstruct=iters / 10))),
               peak_memory=dict(rss_bytes=2**30),
               metrics=dict(metric="top1", fp=fp, quant=quant, ms_per_iter=None),
               units=None if algo == "naive" else [dict(unit="u0", kind="block", iters=iters, final_loss=0.5,
                                                        curve=[[50, 1.0], [100, 0.5]])])
    if status != "ok":
        rec["error"] = dict(type="RuntimeError", message="boom")
    return rec


def test_report_transformer_inits_are_methods_and_transforms_join_every_budget(tmp_path):
    """qdrop after OS (init os) is the row "os+qdrop" beside qdrop from the observers (init naive), in the
    same table; OS alone, like naive, has no iterations and appears in the table of every budget."""
    def nlp(algo, quant, init=None, iters=500):
        r = fake_record("hf:m", "w4a4", algo, 0, quant, 86.0, iters=iters)
        r["config"].update(task="sts", init=init, iters=iters)
        r["kind"], r["run_id"] = "nlp", f"{algo}-{init}-{iters}"
        r["metrics"]["metric"] = "stsb_spearman_x100"
        return r

    rows = [nlp("naive", 70.0), nlp("os", 80.0), nlp("qdrop", 75.0, "naive"), nlp("qdrop", 84.0, "os"),
            nlp("qdrop", 76.0, "naive", 2000), nlp("qdrop", 85.0, "os", 2000)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = render_report(tmp_path, plots=False)
    tables = md.split("## stsb_spearman_x100")[1:]
    assert len(tables) == 2 and "iters=500" in tables[0] and "iters=2000" in tables[1]
    for t, (q, osq) in zip(tables, [("75.00", "84.00"), ("76.00", "85.00")]):
        rows_ = {l.split("|")[1].strip(): l.split("|")[3].strip() for l in t.splitlines() if l.startswith("| ") and "/" in l}
        assert rows_["Naive (observers only)"] == "70.00" and rows_["OS"] == "80.00"
        assert rows_["**QDrop**"] == q and rows_["os+qdrop"] == f"**{osq}**"


def test_report_keeps_a_transform_out_of_a_table_of_other_calibration_batches(tmp_path):
    """A transformer's batch_size also sets its calibration batching unless calib_batch pins it: OS at batch 8
    is not the start of a qdrop run at batch 4 and stays out of its table; with calib_batch pinned it joins."""
    def nlp(algo, quant, batch_size, init=None, **extra):
        r = fake_record("hf:m", "w4a4", algo, 0, quant, 86.0, iters=500)
        r["config"].update(task="sts", init=init, iters=500 if init else 0, batch_size=batch_size, **extra)
        r["kind"], r["run_id"] = "nlp", f"{algo}-{init}-{batch_size}-{extra}"
        r["metrics"]["metric"] = "stsb_spearman_x100"
        return r

    def methods(rows):
        (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        tables = render_report(tmp_path, plots=False).split("## stsb_spearman_x100")[1:]
        return [{l.split("|")[1].strip() for l in t.splitlines() if l.startswith("| ") and "/" in l} for t in tables]

    apart = methods([nlp("os", 80.0, 8), nlp("qdrop", 84.0, 4, "os")])
    assert len(apart) == 2 and not any("OS" in t and "os+qdrop" in t for t in apart)
    pinned = methods([nlp("os", 80.0, 8, calib_batch=8), nlp("qdrop", 84.0, 4, "os", calib_batch=8)])
    assert len(pinned) == 1 and {"OS", "os+qdrop"} <= pinned[0]


def test_report_mean_std_paper_layout(tmp_path):
    rows = []
    for seed, (a, b) in enumerate([(70.0, 60.0), (72.0, 61.0), (74.0, 62.0)]):
        rows.append(fake_record("m1", "w4a4", "qdrop", seed, a, 80.0))
        rows.append(fake_record("m1", "w2a4", "qdrop", seed, b, 80.0))
    rows.append(fake_record("m1", "w4a4", "naive", 0, 65.0, 80.0))
    rows.append(fake_record("m2", "w4a4", "qdrop", 0, 55.5, 75.0))
    rows.append(fake_record("m1", "w4a4", "qdrop", 0, 50.0, 80.0, iters=999))  # another setting: its own table
    rows.append(fake_record("m2", "w2a4", "brecq", 0, 0.0, 75.0, status="failed"))
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = render_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == md
    tables = md.split("## top1")
    assert len(tables) == 3  # iters=100 and iters=999
    t100 = tables[1]
    lines = [l for l in t100.splitlines() if l.startswith("|")]
    assert lines[0] == "| Method | Bits (W/A) | `m1` | `m2` |"
    assert lines[2].startswith("| Full Prec. | 32/32 | 80.00 | 75.00 |")
    sd = statistics.stdev([70.0, 72.0, 74.0])
    assert f"| **QDrop** | 4/4 | **72.00 ± {sd:.2f}** | 55.50 (n=1) |" in lines
    assert "| Naive (observers only) | 4/4 | 65.00 (n=1) | – |" in lines
    assert f"| **QDrop** | 2/4 | 61.00 ± {statistics.stdev([60.0, 61.0, 62.0]):.2f} | – |" in lines
    # row order: FP, then W4A4 block (naive before qdrop), then W2A4
    order = [l.split("|")[1].strip() + l.split("|")[2].strip() for l in lines[2:]]
    assert order == ["Full Prec.32/32", "Naive (observers only)4/4", "**QDrop**4/4", "**QDrop**2/4"]
    assert "iters=100" in tables[1] and "iters=999" in tables[2]
    assert "Failed runs" in md and "boom" in md
    if HAVE_MPL:
        assert (tmp_path / "accuracy_vs_bits_1.png").stat().st_size > 1000
        assert (tmp_path / "loss_m1_w4a4_1.png").exists() and (tmp_path / "loss_m1_w4a4_2.png").exists()
        # m1 W4A4 qdrop at two budgets: accuracy against the time they took
        assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 1000 and "accuracy_vs_time.png" in md
    cost = md.split("## Cost per run")[1]
    assert "iters=100:" in cost and "iters=999:" in cost
    assert "Deployed accuracy" not in md  # no run asked for deployment
    assert not math.isnan(sd)


def test_report_deploy_table(tmp_path):
    rows = []
    for bits, target, sim, dep in [
        ("w8a8", "avx2", 81.0, dict(deployed_top1=80.9, agreement=99.7, kernels="integer", float_compute_nodes=0)),
        ("w8a8", "vnni", 81.2, dict(deployed_top1=70.1, agreement=80.0, kernels="integer", float_compute_nodes=0,
                                    u8s8_saturating_layers=4)),
        ("w4a4", "avx2", 60.0, dict(deployed_top1=59.5, agreement=97.0, kernels="mixed", float_compute_nodes=3)),
        ("w4a4", "vnni", 60.0, dict(error="ExportError: no container for 3 bits")),
    ]:
        rec = fake_record("m1", bits, "naive", 0, sim, 80.0)
        rec["config"].update(backend="onnxruntime", target_cpu=target, deploy="onnxruntime")
        rec["run_id"] += target
        rec["deploy"] = dict(runtime="onnxruntime", **dep)
        if "error" not in dep:
            rec["deploy"].update(ort_version="1.0", latency_ms=dict(b1_ms=0.25, b32_ms=5.5, threads=2),
                                 cpu=dict(vnni=False, flags=["avx2"], u8s8_saturates=True))
        rows.append(rec)
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = render_report(tmp_path, plots=False)
    table = md.split("## Deployed accuracy")[1].split("\n## ")[0]
    assert "onnxruntime 1.0" in table and "2 threads" in table
    assert "| `m1` | 8/8 | naive | onnxruntime / avx2 | 81.00 | 80.90 | 99.70 | integer | 0.25 / 5.50 | avx2-only |" in table
    assert "| onnxruntime / vnni | 81.20 | 70.10 | 80.00 | integer | 0.25 / 5.50 | avx2-only ⚠ saturates |" in table
    assert "| `m1` | 4/4 | naive | onnxruntime / avx2 | 60.00 | 59.50 | 97.00 | mixed (3 float layers) |" in table
    assert "| onnxruntime / vnni | 60.00 | failed |" in table and "ExportError: no container for 3 bits" in table
    # the accuracy tables are unchanged: one per target, as target_cpu is a result setting
    assert md.count("| Full Prec. | 32/32 |") == 2


def test_report_on_real_tiny_sweep(tiny_results, capsys):
    from qdrop.bench import report_main

    assert report_main([str(tiny_results["results"])]) == 0
    md = (tiny_results["results"] / "report.md").read_text()
    assert "| Full Prec. | 32/32 |" in md and "4/4" in md
    if HAVE_MPL:
        assert (tiny_results["results"] / "accuracy_vs_bits.png").exists()
        assert list(tiny_results["results"].glob("loss_*.png"))
    assert report_main([str(tiny_results["results"] / "nothing")]) == 2


# ---- analyze -------------------------------------------------------------------------------

def test_analyze_units_and_flatness(tiny_results, tmp_path):
    from qdrop.bench import analyze_main
    from qdrop.bench.analyze import analyze

    out = tmp_path / "an"
    result = analyze([tiny_results["results"]], out=out, samples=12, batch_size=6, draws=2, scales=(0.5, 2.0))
    (a,) = result.values()
    labels = [v["label"] for v in a["variants"]]
    assert labels == ["FP32 (steps of w4a4)", "naive w4a4", "qdrop w4a4"]
    fp = a["variants"][0]
    assert fp["increase"]["0.5"]["mean"] != 0.0 and len(fp["increase"]["2.0"]["values"]) == 2
    assert a["units"] and all("alone_mse" in e for u in a["units"] for e in u["by"].values())
    assert any(e.get("recon_final") for u in a["units"] for e in u["by"].values())  # qdrop's recon.json
    assert all(u["by"]["naive w4a4"]["alone_mse"] >= 0 for u in a["units"])
    for f in ("analysis.json", "analysis.md"):
        assert (out / f).exists()
    if HAVE_MPL:
        assert list(out.glob("flatness_*.png")) and list(out.glob("units_*.png"))
    assert analyze_main([str(tmp_path / "missing")]) == 2


def test_reconstruction_time_counts_the_distribution_correction(tmp_path):
    """A unit's `seconds` times its loop only; PD-Quant's correction before it is most of a qdrop-dc run's time
    (~9x the loop on ResNet-20), so the accuracy-vs-time plot adds it; a resumed run still sums its units."""
    from qdrop.bench.report import _recon_seconds
    from qdrop.bench.runner import _unit_curves

    dc = dict(batches=2, stat_loss_first=1.0, stat_loss_last=0.5, input_change=0.1, seconds=70.0)
    (tmp_path / "recon.json").write_text(json.dumps(dict(unit_reports=[
        dict(unit="layer1.0", iters=4, seconds=10.0, distribution_correction=dc), dict(unit="linear", iters=4, seconds=5.0)])))
    units = _unit_curves(tmp_path)
    assert units[0]["dc_seconds"] == 70.0 and "dc_seconds" not in units[1]
    assert _recon_seconds(dict(units=units, seconds=dict(reconstruct=3.0))) == 85.0  # not the process's 3 s
    assert _recon_seconds(dict(units=None, seconds=dict(reconstruct=3.0))) == 3.0
