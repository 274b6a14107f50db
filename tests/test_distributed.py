"""Data-parallel reconstruction (qdrop.distributed): two gloo processes on CPU, one thread each.

API tests spawn two workers (torch.multiprocessing) on the small CNN of test_recon; command-line
tests start `torchrun --standalone --nproc-per-node 2 -m qdrop quantize` on a tiny `module:` CNN
over a generated image folder (test_bench's). Checked: the ranks end with identical parameters
and activation ranges; the result is close to a one-process run on the same data (not equal:
each rank samples its share of every batch from its own shard); each rank caches half the
samples; a crashed torchrun run, rerun, gives exactly the uninterrupted run's model; a world
the calibration set or the batch cannot be split over is one error line and nothing written.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import qdrop
from qdrop import distributed as qdist
from qdrop.errors import UsageError
from qdrop.graph import quantizers
from qdrop.io import torch_threads
from test_bench import TINY_MODEL  # noqa: E402
from test_recon import small_setup  # noqa: E402 (the same small CNN)

ROOT = Path(__file__).resolve().parents[1]
N, ITERS, BATCH = 64, 60, 16


def act_ranges(qmodel) -> dict:
    return {n: (q.scale.detach().clone(), q.zero_point.detach().clone()) for n, q in quantizers(qmodel) if q.role == "act"}


def output_error(qmodel, model, x) -> float:
    with torch.no_grad():
        return (qmodel(x) - model(x)).pow(2).sum(1).mean().item()


def run_recon(state_path=None, on_unit_done=None) -> dict:
    model, qmodel, x = small_setup()
    ranges = act_ranges(qmodel)
    before = output_error(qmodel, model, x)
    report = qdrop.reconstruct(qmodel, model, x, algo="qdrop", iters=ITERS, batch_size=BATCH, progress=False,
                               state_path=state_path, on_unit_done=on_unit_done)
    return dict(state=qmodel.state_dict(), report=report, before=before, after=output_error(qmodel, model, x),
                ranges=ranges)


def _worker(rank: int, world: int, port: int, out: str, what: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    qdist.init_from_env("cpu")
    try:
        result = {}
        if what == "recon":
            result = run_recon()
            # min/max observers are reduced over the ranks: sharded calibration = one process on all of it
            _, q, _ = small_setup(a_observer="minmax", calib=qdist.shard)
            result["minmax_sharded"] = act_ranges(q)
            # mse observers on different data: ranges differ, rank 0's are used everywhere, with a warning
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, q, _ = small_setup(calib=qdist.shard)
            result["mse_sharded"] = act_ranges(q)
            result["warnings"] = [str(w.message) for w in caught]
        elif what.startswith("resume"):
            state = str(Path(out) / "state.pt")

            def crash_after_second_unit(step, name):
                if what == "resume-crash" and step == 1:
                    qdist.barrier()  # (rank 0 has saved the state file: it saves before this call)
                    raise KeyboardInterrupt("simulated kill")

            try:
                result = run_recon(state_path=state, on_unit_done=crash_after_second_unit)
            except KeyboardInterrupt:
                result = dict(crashed=True)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        qdist.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out: Path, what: str, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), str(out), what), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("recon"), "recon")


@pytest.fixture(scope="module")
def one_process():
    with torch_threads(1):
        return run_recon()


def test_ranks_end_with_identical_parameters_and_ranges(two_ranks):
    r0, r1 = two_ranks
    assert r0["state"].keys() == r1["state"].keys()
    differ = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not differ, differ
    for name, (s, z) in r0["ranges"].items():  # calibration on the same batches: the same ranges, before any sync
        assert torch.equal(s, r1["ranges"][name][0]) and torch.equal(z, r1["ranges"][name][1]), name


def test_two_ranks_close_to_one_process(two_ranks, one_process):
    r0 = two_ranks[0]
    assert r0["before"] == one_process["before"]  # the same model, data and calibration
    for name, (s, z) in one_process["ranges"].items():
        assert torch.equal(s, r0["ranges"][name][0]) and torch.equal(z, r0["ranges"][name][1]), name
    one, two = one_process["after"], r0["after"]
    assert two < 0.8 * r0["before"] and one < 0.8 * one_process["before"], (one_process["before"], one, two)
    assert 1 / 1.5 < two / one < 1.5, (one, two)  # batches are drawn differently: close, not equal


def test_each_rank_caches_half_the_samples(two_ranks, one_process):
    reports = [r["report"] for r in two_ranks]
    assert [r["n_calib_rank"] for r in reports] == [N // 2, N // 2]
    assert all(r["n_calib"] == N and r["world"] == 2 for r in reports)
    assert "world" not in one_process["report"] and "ranks" not in one_process["report"]
    ranks = reports[0]["ranks"]
    assert [r["n_calib"] for r in ranks] == [N // 2, N // 2] and all(r["peak_rss_mb"] > 0 for r in ranks)
    for r in ranks:
        assert r["cache_bytes"] == one_process["report"]["cache_bytes"] // 2, (r, one_process["report"]["cache_bytes"])
    # the losses in the report are the global batch's, the same on both ranks
    assert [u["curve"] for u in reports[0]["unit_reports"]] == [u["curve"] for u in reports[1]["unit_reports"]]


def test_min_max_is_reduced_and_differing_ranges_are_unified(two_ranks):
    r0, r1 = two_ranks
    _, q, _ = small_setup(a_observer="minmax", calib=lambda x: x)  # one process, all 64 samples
    for name, (s, z) in act_ranges(q).items():
        for r in (r0, r1):
            assert torch.equal(r["minmax_sharded"][name][0], s) and torch.equal(r["minmax_sharded"][name][1], z), name
    for name, (s, z) in r0["mse_sharded"].items():
        assert torch.equal(s, r1["mse_sharded"][name][0]) and torch.equal(z, r1["mse_sharded"][name][1]), name
    assert any("differ across ranks" in w for w in r0["warnings"]), r0["warnings"]
    assert not any("differ across ranks" in w for w in r1["warnings"])


@pytest.mark.slow  # the API twin of test_torchrun_quantize_crash_and_rerun_match_uninterrupted (CI's fast subset)
def test_resumed_after_a_crash_equals_uninterrupted(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref = spawn(tmp_path / "ref", "resume")
    crashed = spawn(tmp_path / "run", "resume-crash")  # both ranks stop after the second unit
    assert all(r.get("crashed") for r in crashed) and (tmp_path / "run" / "state.pt").exists()
    resumed = spawn(tmp_path / "run", "resume")
    assert len(resumed[0]["report"]["unit_reports"]) == len(ref[0]["report"]["unit_reports"])
    for r in (0, 1):
        for k, v in ref[r]["state"].items():
            assert torch.equal(v, resumed[r]["state"][k]), (r, k)


def test_world_checks_and_single_process_path():
    assert qdist.shard_sizes(10, 3) == [4, 3, 3]
    qdist.check_shards(64, 16, world=1)
    qdist.check_shards(64, 16, world=2)
    with pytest.raises(UsageError, match="calibration set has 1 samples"):
        qdist.check_shards(1, 1, world=2)
    with pytest.raises(UsageError, match="batch size is 2"):
        qdist.check_shards(64, 2, world=3)
    assert not qdist.active() and qdist.world_size() == 1 and qdist.rank() == 0
    x = torch.arange(6)
    assert qdist.shard(x) is x  # no group: everything, untouched


def test_transformers_and_other_commands_refuse_torchrun(monkeypatch, capsys):
    from qdrop.cli import main
    from qdrop.nlp_pipeline import run_nlp_quantize

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="one process"):
        run_nlp_quantize("hf:minilm", "sts")
    assert main(["inspect", "cifar10_resnet20", "--random"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only `qdrop quantize`" in err


# ---- the command line under torchrun ----------------------------------------------------------
# crash rank 0 right after it saved the reconstruction state of the first unit (torchrun then stops rank 1)
CRASHER = '''
import os, sys
import qdrop.recon.engine as engine
save = engine.atomic_torch_save
def crash_after_save(obj, path):
    save(obj, path)
    if os.environ.get("RANK") == "0":
        os._exit(9)
engine.atomic_torch_save = crash_after_save
from qdrop.cli import main
sys.exit(main())
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    base = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            d = base / "imagenet" / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(8):
                pixels = rng.integers(0, 256, (40, 46, 3), dtype=np.uint8)
                pixels[..., c] = np.clip(pixels[..., c].astype(int) + 80, 0, 255)
                Image.fromarray(pixels).save(d / f"img{i}.png")
    (base / "tiny_model.py").write_text(TINY_MODEL)
    (base / "crasher.py").write_text(CRASHER)
    return base


def torchrun(tiny, out, *extra, script=None):
    env = {**os.environ, "QDROP_OFFLINE": "1", "QDROP_CACHE": str(tiny / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    target = [str(script)] if script else ["-m", "qdrop"]
    args = ["quantize", "--model", f"module:{tiny / 'tiny_model.py'}:make", "--data", str(tiny / "imagenet"),
            "--bits", "w4a4", "--algo", "qdrop", "--calib", "16", "--batch-size", "4", "--iters", "8", "--threads", "1",
            "--out", str(out), *extra]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *args], capture_output=True, text=True, env=env, timeout=300)


def test_torchrun_quantize_crash_and_rerun_match_uninterrupted(tiny, tmp_path):
    ref = torchrun(tiny, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert ref.stdout.count("quantized") == 1, ref.stdout  # rank 0 prints, rank 1 does not
    metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert metrics["world"] == 2 and [r["n_calib"] for r in metrics["ranks"]] == [8, 8]
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["world"] == 2
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["config.json", "metrics.json", "model.pt", "recon.json"]

    out = tmp_path / "run"
    crashed = torchrun(tiny, out, script=tiny / "crasher.py")
    assert crashed.returncode != 0 and (out / "recon_state.pt").exists() and not (out / "metrics.json").exists()
    rerun = torchrun(tiny, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["fp"], m["quant"]) == (metrics["fp"], metrics["quant"])
    assert not (out / "recon_state.pt").exists()


def test_torchrun_world_larger_than_calibration_set(tiny, tmp_path):
    r = torchrun(tiny, tmp_path / "o", "--calib", "1", "--batch-size", "1")
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("qdrop:")]
    assert len(lines) == 1 and "calibration set has 1 samples" in lines[0], r.stderr[-3000:]
    # (torchrun itself then reports the failed workers, with its own launcher traceback; none comes from qdrop)
    assert "qdrop/" not in r.stderr.split("ChildFailedError")[0], r.stderr[-3000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
