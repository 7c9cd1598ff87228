"""The claims grid: planning, resuming run by run, mean ± std over seeds, verdicts, tables."""
import dataclasses
import json
import os

import numpy as np
import pytest

from spp_jax import seedstats
from spp_jax.config_grammar import config_dict
from spp_jax.errors import ConfigError, NoCheckpoint
from spp_jax.train import claims, grid

TINY = ["width=0.0625", "fc_dim=32", "train_examples=64", "val_examples=16", "epochs=1",
        "batch_size=16", "eval_batch_size=16", "mean_samples=16", "pca_from_data=false",
        "progress=false", "plot=false", "protocols=1crop,1full,10view", "async_checkpointing=false"]


def fake_errors(run):
    """Deterministic per-run errors that depend on model, variant, view and seed."""
    base = {"nospp": 30.0, "single": 26.0, "multi": 25.0}[run.variant.key]
    base += {"zf5": 0.0, "overfeat7": -3.0}[run.model]
    views = {"1crop": 0.0, "1full": -2.0, "10view": -3.0, "multiview": -4.0}
    if run.variant.key == "nospp":
        views = {k: v for k, v in views.items() if k in ("1crop", "10view")}
    jitter = [0.0, 1.5, -1.0][run.seed]
    return {p: (base + d + jitter, (base + d + jitter) / 10) for p, d in views.items()}


class FakeTrainer:
    """Writes what make train writes for the grid (eval.json with the config) without training."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, workdir):
        run = next(r for r in self.runs if r.workdir == workdir)
        self.calls.append(workdir)
        errs = fake_errors(run)
        report = {"results": {p: {"top1_err": a, "top5_err": b} for p, (a, b) in errs.items()},
                  "config": grid.config_dict(cfg)}
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f)
        with open(os.path.join(workdir, "run_summary.json"), "w") as f:
            json.dump({"train_seconds": 60.0, "total_seconds": 90.0}, f)
        return report


def plan(root, seeds=(0, 1, 2), models=("zf5", "overfeat7"), extra=()):
    return grid.plan("embedded", [*TINY, *extra], str(root), models=models, seeds=seeds, data_seed=0)


def test_plan_configs_and_workdirs(tmp_path):
    runs = plan(tmp_path)
    assert len(runs) == 2 * 3 * 3
    r = runs[0]
    assert (r.model, r.variant.key, r.seed) == ("zf5", "nospp", 0)
    assert r.workdir == os.path.join(str(tmp_path), "zf5", "nospp", "seed0")
    assert not r.config.spp and r.config.sizes == (224,)
    multi = [x for x in runs if x.variant.key == "multi"]
    assert all(x.config.sizes == (180, 224) and x.config.size_schedule == "multi" for x in multi)
    assert {x.config.seed for x in runs} == {0, 1, 2} and {x.config.data_seed for x in runs} == {0}
    # one generated copy of the embedded images for the whole grid, unless the user names one
    assert {x.config.data_dir for x in runs} == {os.path.join(str(tmp_path), "data")}
    mine = plan(tmp_path, seeds=(0,), extra=[f"data_dir={tmp_path / 'elsewhere'}"])
    assert {x.config.data_dir for x in mine} == {str(tmp_path / "elsewhere")}
    with pytest.raises(ConfigError):  # every config is checked before anything runs
        plan(tmp_path, extra=["dropout=2"])


def test_grid_reuses_finished_runs_and_reruns_changed_ones(tmp_path):
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path, seeds=(0, 1))
    first = grid.run_grid(trainer.runs, trainer)
    assert len(trainer.calls) == len(trainer.runs) and not any(r.reused for r in first)
    trainer.calls.clear()
    again = grid.run_grid(trainer.runs, trainer)
    assert trainer.calls == [] and all(r.reused for r in again)
    assert [r.errors for r in again] == [r.errors for r in first]
    assert all(r.seconds == 90.0 for r in again)
    # One more seed: only its runs train; a changed key makes every run train again.
    trainer.runs = plan(tmp_path, seeds=(0, 1, 2))
    grid.run_grid(trainer.runs, trainer)
    assert sorted(trainer.calls) == sorted(r.workdir for r in trainer.runs if r.seed == 2)
    # Keys that only change how a run is watched (progress bars, logging) keep it reused.
    trainer.calls.clear()
    trainer.runs = plan(tmp_path, seeds=(0,), extra=["log_every=7", "data_threads=1", "keep_checkpoints=5"])
    assert all(r.reused for r in grid.run_grid(trainer.runs, trainer)) and trainer.calls == []
    trainer.runs = plan(tmp_path, seeds=(0,), extra=["fc_dim=48"])
    grid.run_grid(trainer.runs, trainer)
    assert len(trainer.calls) == len(trainer.runs)


def test_aggregate_and_verdicts_against_numpy(tmp_path):
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path)
    results = grid.run_grid(trainer.runs, trainer)
    cells = claims.aggregate(results)
    c = cells[("overfeat7", "single", "10view")]
    want = [26.0 - 3.0 - 3.0 + j for j in (0.0, 1.5, -1.0)]
    assert c.top1.mean == pytest.approx(np.mean(want)) and c.top1.std == pytest.approx(np.std(want, ddof=1))
    assert c.top5.mean == pytest.approx(np.mean(want) / 10)
    assert c.seeds == (0, 1, 2)
    assert ("zf5", "nospp", "1full") not in cells  # no-SPP nets have no full-image views
    found = {v.claim: v for v in claims.verdicts(results)}
    # The jitter is the same per seed in every cell, as the luck of an initialisation is
    # shared by the variants of one seed: paired over seeds, every difference is exact.
    spp = found["zf5, 10-view: SPP beats no SPP"]
    assert spp.diff == pytest.approx(4.0) and spp.outcome == seedstats.HOLDS and spp.paired
    ms = found["zf5, 1 crop: multi-size training beats single-size"]
    assert ms.diff == pytest.approx(1.0) and ms.outcome == seedstats.HOLDS and ms.se == 0.0
    full = found["overfeat7, SPP multi-size: 1 full beats 1 crop"]
    assert full.paired and full.diff == pytest.approx(2.0) and full.outcome == seedstats.HOLDS
    assert len(found) == 2 * (2 * 2 + 2 * 2)


def test_variants_are_paired_by_seed(tmp_path):
    """ZF-5's first three seeds (1-crop top-1 %): seed 2 is bad for both variants. Unpaired,
    multi-size's loss is lost in that spread; paired by seed it is 4.8 +- 1.7 points, beyond
    the 5 % bar (t = 4.30 at 2 degrees of freedom)."""
    runs = {(r.variant.key, r.seed): r for r in plan(tmp_path, models=("zf5",))}
    single, multi = [39.4, 29.4, 57.4], [43.4, 33.0, 64.2]
    results = [grid.RunResult(runs[(v, s)], {"1crop": (e, 0.0)}, 1.0, True)
               for v, errs in (("single", single), ("multi", multi)) for s, e in enumerate(errs)]
    (v,) = [x for x in claims.verdicts(results) if "multi-size" in x.claim]
    d = np.subtract(single, multi)
    assert v.paired and v.n == 3 and v.diff == pytest.approx(d.mean())
    assert v.se == pytest.approx(np.std(d, ddof=1) / np.sqrt(3))
    assert v.outcome == seedstats.REVERSED and abs(v.diff) > 4.303 * v.se
    welch = seedstats.compare("x", ("a", single), ("b", multi), paired=False)
    assert welch.outcome == seedstats.NOISE  # what an unpaired test would have said
    # Only the seeds both variants finished are paired.
    (v2,) = [x for x in claims.verdicts(results[:3] + results[3:5]) if "multi-size" in x.claim]
    assert v2.n == 2 and v2.diff == pytest.approx(d[:2].mean())


def test_write_claims(tmp_path):
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path, seeds=(0, 1, 2))
    results = grid.run_grid(trainer.runs, trainer)
    md = claims.write_claims(str(tmp_path), results, "test grid")
    data = json.loads((tmp_path / "claims.json").read_text())
    assert (tmp_path / "claims.png").stat().st_size > 0
    assert "| zf5 | 30.2 ± 1.3 / 3.0 ± 0.1 |" not in md  # 10-view, not 1 crop
    assert "| zf5 | 27.2 ± 1.3 / 2.7 ± 0.1 | 23.2 ± 1.3 / 2.3 ± 0.1 | 22.2 ± 1.3 / 2.2 ± 0.1 |" in md
    assert len(data["runs"]) == 18 and len(data["verdicts"]) == 16
    cell = next(c for c in data["cells"] if (c["model"], c["variant"], c["view"]) == ("zf5", "multi", "multiview"))
    assert cell["top1"]["values"] == [21.0, 22.5, 20.0]


def test_multiview_compared_with_ten_view_on_the_same_images(tmp_path):
    """Multi-view saw 4 of 10 images: its verdict and the matched row use 10-view on those 4."""
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path, seeds=(0, 1, 2), models=("zf5",), extra=["val_examples=16"])
    rng = np.random.default_rng(0)
    hits = {}

    def with_hits(cfg, workdir):
        report = FakeTrainer.__call__(trainer, cfg, workdir)
        for p, r in report["results"].items():
            idx = list(range(4 if p == "multiview" else 10))
            h1 = rng.random(len(idx)) < 0.6
            hits[(workdir, p)] = h1
            r.update(indices=idx, top1_hits=h1.astype(int).tolist(), top5_hits=[1] * len(idx),
                     top1_err=100 * (1 - h1.mean()), top5_err=0.0)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f)
        return report

    grid.run_grid(trainer.runs, with_hits)
    results = grid.run_grid(trainer.runs, train=False)  # read back from eval.json
    multi = [r for r in results if r.run.variant.key == "multi"]
    want = [100 * (1 - hits[(r.run.workdir, "10view")][:4].mean()) for r in multi]
    cell = claims.aggregate(results)[("zf5", "multi", claims.MATCHED)]
    assert list(cell.top1.values) == pytest.approx(want)
    mv = [100 * (1 - hits[(r.run.workdir, "multiview")].mean()) for r in multi]
    v = {x.claim: x for x in claims.verdicts(results)}["zf5, SPP multi-size: multi-view beats 10-view"]
    assert v.paired and v.diff == pytest.approx(np.mean(want) - np.mean(mv))
    assert ("zf5", "nospp", claims.MATCHED) not in claims.aggregate(results)  # no multi-view there


def test_validation_curve_and_when_a_run_left_chance(tmp_path):
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path, seeds=(0,), models=("zf5",))
    grid.run_grid(trainer.runs, trainer)
    run = trainer.runs[0]
    recs = [{"kind": "train", "epoch": 0, "loss": 2.3},
            *({"kind": "epoch", "epoch": e, "val_top1_error": v / 100}
              for e, v in enumerate([89, 88, 85, 79, 60])),
            {"kind": "epoch", "epoch": 3, "val_top1_error": 0.81}]  # a resumed run's redo wins
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n")
    got = grid.finished(run)
    assert got.val_curve == pytest.approx((89, 88, 85, 81, 60))
    assert grid.left_chance(got.val_curve) == 5 and grid.left_chance([90, 88]) is None
    assert "below 80 % from epoch 5" in claims.curve_text(got.val_curve)
    # The plateau's length: 4 epochs at chance; a run that never left counts all its epochs.
    assert (grid.epochs_at_chance(got.val_curve), grid.epochs_at_chance([90, 88]),
            grid.epochs_at_chance(())) == (4.0, 2.0, None)
    assert grid.finished(trainer.runs[1]).val_curve == ()  # no metrics.jsonl: no curve


def test_report_of_a_grid_in_progress(tmp_path):
    """train=false: nothing trains; cells over fewer seeds say so, unfinished runs are listed."""
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path, seeds=(0, 1), models=("zf5",))
    grid.run_grid([r for r in trainer.runs if r.seed == 0 or r.variant.key == "single"], trainer)
    trainer.calls.clear()
    results = grid.run_grid(trainer.runs, trainer, train=False)
    assert trainer.calls == [] and len(results) == 4
    assert grid.run_grid(trainer.runs, train=False) == results  # no trainer needed at all
    missing = grid.unfinished(trainer.runs, results)
    md = claims.write_claims(str(tmp_path), results, "t", missing=missing, make_plot=False)
    assert "(in progress: 4 of 6 runs finished)" in md
    single = [26.0 - 3.0 + j for j in (0.0, 1.5)]  # 10-view, seeds 0 and 1
    no_spp = 30.0 - 3.0  # seed 0 only
    assert (f"| zf5 | {no_spp:.1f} / {no_spp / 10:.1f} (n=1) | {np.mean(single):.1f} ± "
            f"{np.std(single, ddof=1):.1f} / ") in md
    assert md.count("**not finished**") == 2 and "`zf5/multi/seed1`: **not finished**" in md
    data = json.loads((tmp_path / "claims.json").read_text())
    assert data["missing"] == ["zf5/nospp/seed1", "zf5/multi/seed1"]


def test_scale_probe_of_the_spp_runs(tmp_path):
    trainer = FakeTrainer()
    trainer.runs = plan(tmp_path, models=("zf5",))
    results = grid.run_grid(trainer.runs, trainer)
    calls = []

    def probe(cfg, workdir, sides):
        """Single-size loses 4 points per 64 px away from side 256, multi-size 1 point."""
        run = next(r for r in trainer.runs if r.workdir == workdir)
        calls.append(workdir)
        if (run.variant.key, run.seed) == ("single", 2):
            raise NoCheckpoint("no checkpoints")  # e.g. a copy of committed results
        slope = {"single": 4.0, "multi": 1.0}[run.variant.key]
        jitter = [0.0, 0.5, -0.5][run.seed]
        res = {str(s): {"top1_err": 20 + slope * abs(s - 256) / 64 + jitter, "top5_err": 1.0} for s in sides}
        with open(os.path.join(workdir, "scale_probe.json"), "w") as f:
            json.dump({"sides": list(sides), "results": res, "config": config_dict(cfg)}, f)

    sides = (128, 256, 384)
    probed = grid.probe_scales(results, sides, probe)
    spp_runs = [r.workdir for r in trainer.runs if r.config.spp]
    assert sorted(calls) == sorted(spp_runs)  # no-SPP nets have no full view at other scales
    by = {(r.run.variant.key, r.run.seed): r for r in probed}
    assert by[("nospp", 0)].scale_errors == {} and by[("single", 2)].scale_errors == {}
    assert by[("multi", 1)].scale_errors == {128: (22.5, 1.0), 256: (20.5, 1.0), 384: (22.5, 1.0)}
    cells = claims.scale_cells(probed)
    assert cells[("zf5", "single", 128)].values == (28.0, 28.5)  # seeds 0 and 1 only
    assert cells[("zf5", "single", 128)].seeds == (0, 1)
    assert cells[("zf5", "multi", 384)].mean == pytest.approx(22.0)
    assert cells[("zf5", "multi", 384)].std == pytest.approx(np.std([22, 22.5, 21.5], ddof=1))
    found = {v.claim: v for v in claims.scale_verdicts(cells)}
    far = found["zf5, 1 full at shorter side 128: multi-size training beats single-size"]
    # Paired on the seeds both have (0 and 1): single 28, 28.5 against multi 22, 22.5.
    assert far.diff == pytest.approx(6.0) and far.n == 2 and far.outcome == seedstats.HOLDS
    assert found["zf5, 1 full at shorter side 256: multi-size training beats single-size"].outcome == seedstats.NOISE
    # Probed runs are not probed again (only the one without a checkpoint is retried).
    calls.clear()
    again = grid.probe_scales(probed, sides, probe)
    assert calls == [by[("single", 2)].run.workdir]
    assert [r.scale_errors for r in again] == [r.scale_errors for r in probed]
    # A run trained further in its workdir (more epochs: eval.json rewritten) must not keep
    # the probe of its earlier checkpoint: it is probed again.
    run = by[("multi", 1)].run
    longer = dataclasses.replace(run, config=dataclasses.replace(run.config, epochs=run.config.epochs + 1))
    calls.clear()
    (reprobed,) = grid.probe_scales([dataclasses.replace(by[("multi", 1)], run=longer)], sides, probe)
    assert calls == [run.workdir] and reprobed.scale_errors == by[("multi", 1)].scale_errors
    with open(os.path.join(run.workdir, "scale_probe.json")) as f:
        assert json.load(f)["config"]["epochs"] == run.config.epochs + 1
    calls.clear()
    assert grid.probe_scales([by[("multi", 1)]], sides, probe)[0].scale_errors  # back: again
    assert calls == [run.workdir]
    md = claims.write_claims(str(tmp_path), again, "test grid")
    assert "| 256 (training) | 20.2 ± 0.4 (n=2) | 20.0 ± 0.5 |" in md
    assert (tmp_path / "claims_scale.png").stat().st_size > 0
    data = json.loads((tmp_path / "claims.json").read_text())
    assert len(data["scale_probe"]) == 6 and len(data["scale_verdicts"]) == 3


def test_tiny_real_grid_resumes(tmp_path):
    """Two real tiny runs (one variant, two seeds): tables from their eval.json, then reused."""
    # One compile cache for both runs: the second compiles nothing.
    over = [*TINY, "protocols=1crop,1full", f"compile_cache_dir={tmp_path / 'cache'}"]
    runs = grid.plan("embedded", over, str(tmp_path), models=("zf5",), variants=grid.VARIANTS[1:2],
                     seeds=(0, 1), data_seed=0)
    results = grid.run_grid(runs)
    for r in results:
        with open(os.path.join(r.run.workdir, "eval.json")) as f:
            report = json.load(f)
        assert r.errors["1full"] == (report["results"]["1full"]["top1_err"],
                                     report["results"]["1full"]["top5_err"])
    # The test-scale probe from each run's checkpoint: at the protocols' side it gives
    # exactly the 1-full errors that training's own testing recorded.
    probed = grid.probe_scales(results, (192, 256))
    for r in probed:
        assert set(r.scale_errors) == {192, 256} and r.scale_errors[256] == r.errors["1full"]
        assert os.path.exists(os.path.join(r.run.workdir, "scale_probe.md"))
    calls = []
    again = grid.run_grid(runs, lambda cfg, w: calls.append(w))
    assert calls == [] and [r.errors for r in again] == [r.errors for r in results]
    cells = claims.aggregate(again)
    vals = [r.errors["1crop"][0] for r in results]
    assert cells[("zf5", "single", "1crop")].top1.mean == pytest.approx(np.mean(vals))


def test_entry_point_config(tmp_path, capsys):
    from experiments import claims as entry
    with pytest.raises(SystemExit) as e:
        entry.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "seeds=0,1,2" in out and "models=zf5,overfeat7" in out and "train_preset=embedded" in out
    for bad, words in ((["seeds=-1"], "seeds=-1"), (["models=vgg"], "models=vgg"),
                       (["seed=3"], "set by the grid"), (["lerning_rate=1"], "unknown key 'lerning_rate'"),
                       (["dropout=2"], "dropout=2")):
        with pytest.raises(SystemExit) as e:
            entry.main(["--workdir", str(tmp_path / "w"), *bad])
        assert str(e.value.code).startswith("error: ") and words in str(e.value.code)
        assert "\n" not in str(e.value.code)
    assert not (tmp_path / "w").exists()  # nothing written before the whole grid is checked
    with pytest.raises(SystemExit) as e:  # a report of a grid where nothing has finished
        entry.main(["--workdir", str(tmp_path / "w"), "train=false"])
    assert "no run of the grid has finished" in str(e.value.code) and not (tmp_path / "w").exists()
    assert entry.split_overrides(["seeds=1", "val_examples=32"]) == (["seeds=1"], ["val_examples=32"])


def test_controlled_probe_compares_each_claims_gain_over_seeds(tmp_path):
    """A baseline grid (dataset=shapes) and a probe (dataset=shapes_wide), ZF-5, 3 seeds:
    multi-size's gain over single-size per seed is -4, -3, -6 in the baseline and 2, 1, 3
    in the probe; paired by seed the gain grows by 6, 4, 9 points (hand-checked with numpy)."""
    from spp_jax.train import controlled
    base = {(r.variant.key, r.seed): r for r in plan(tmp_path / "a", models=("zf5",))}
    probe = {(r.variant.key, r.seed): r
             for r in plan(tmp_path / "b", models=("zf5",), extra=["dataset=shapes_wide"])}
    errs = {"a": {"single": [40.0, 30.0, 58.0], "multi": [44.0, 33.0, 64.0]},
            "b": {"single": [38.0, 31.0, 50.0], "multi": [36.0, 30.0, 47.0]}}
    res = {g: [grid.RunResult(runs[(v, s)], {"1crop": (e, 0.0)}, 1.0, True)
               for v, per in errs[g].items() for s, e in enumerate(per)]
           for g, runs in (("a", base), ("b", probe))}
    b = controlled.Baseline("dataset=shapes_wide", "dataset=shapes", "a", tuple(res["a"]))
    cells = controlled.gain_cells(res["b"], b)
    assert list(cells) == [("zf5", "multi-size training beats single-size", "1crop")]
    (c,) = cells.values()
    assert c.there.values == (-4.0, -3.0, -6.0) and c.here.values == (2.0, 1.0, 3.0)
    (v,) = controlled.gain_verdicts(cells, b)
    d = np.array([6.0, 4.0, 9.0])
    assert v.paired and v.n == 3 and v.diff == pytest.approx(d.mean())
    assert v.se == pytest.approx(np.std(d, ddof=1) / np.sqrt(3))
    assert v.outcome == seedstats.HOLDS and v.diff > 4.303 * v.se
    # Seed 2 missing from the probe: the pair is over seeds 0 and 1 only.
    (v2,) = controlled.gain_verdicts(controlled.gain_cells(res["b"][:2] + res["b"][3:5], b), b)
    assert v2.n == 2 and v2.diff == pytest.approx(5.0)
    md = claims.write_claims(str(tmp_path / "b"), res["b"], "t", make_plot=False, baseline=b)
    assert "Controlled probe: dataset=shapes_wide against dataset=shapes" in md
    data = json.loads((tmp_path / "b" / "claims.json").read_text())
    assert data["baseline"]["cells"][0]["gain_there"]["values"] == [-4.0, -3.0, -6.0]


def test_controlled_probe_reports_the_changes_own_effect_per_cell(tmp_path):
    """A one-variant grid (ZF-5 multi-size, dropout=0) against the same cell with dropout 0.5:
    no claim to compare, but the change's effect per cell.  1-crop errors per seed 50, 40, 60
    with dropout 0.5 and 42, 35, 47 without (paired differences 8, 5, 13); plateaus of 4, 6
    and (never left: all 8 epochs) 8 epochs against 2, 3, 5 (differences 2, 3, 3)."""
    from spp_jax.train import controlled
    multi = [v for v in grid.VARIANTS if v.key == "multi"]
    res = {}
    for g, extra, errs, left in (("a", [], [50.0, 40.0, 60.0], [5, 7, None]),
                                 ("b", ["dropout=0"], [42.0, 35.0, 47.0], [3, 4, 6])):
        runs = grid.plan("embedded", [*TINY, *extra], str(tmp_path / g), models=("zf5",),
                         variants=multi, seeds=(0, 1, 2), data_seed=0)
        curves = [tuple(90.0 if e + 1 < (k or 99) else 70.0 for e in range(8)) for k in left]
        res[g] = [grid.RunResult(r, {"1crop": (e, 0.0)}, 1.0, True, val_curve=c,
                                 images={"1crop": 500})
                  for r, e, c in zip(runs, errs, curves)]
    b = controlled.Baseline("dropout=0", "dropout=0.5", "a", tuple(res["a"]))
    assert controlled.gain_cells(res["b"], b) == {}
    cells = controlled.effect_cells(res["b"], b)
    assert list(cells) == [("zf5", "multi", "1crop"), ("zf5", "multi", controlled.PLATEAU)]
    assert cells[("zf5", "multi", controlled.PLATEAU)].there.values == (4.0, 6.0, 8.0)
    err, plateau = controlled.effect_verdicts(cells, b, {"1crop": 500})
    for v, d, unit in ((err, np.array([8.0, 5.0, 13.0]), "points"),
                       (plateau, np.array([2.0, 3.0, 3.0]), "epochs")):
        assert v.paired and v.n == 3 and v.unit == unit and v.diff == pytest.approx(d.mean())
        assert v.se == pytest.approx(np.std(d, ddof=1) / np.sqrt(3))
    assert err.outcome == seedstats.NOISE and err.bar == pytest.approx(4.303 * err.se, rel=1e-3)
    assert plateau.outcome == seedstats.HOLDS and "2.67 epochs better" in plateau.sentence()
    md = claims.write_claims(str(tmp_path / "b"), res["b"], "t", make_plot=False, baseline=b)
    assert "The change itself: dropout=0 against dropout=0.5" in md
    assert "zf5, SPP multi-size: epochs at chance | 6.0 ± 2.0 | 3.3 ± 1.5" in md
    data = json.loads((tmp_path / "b" / "claims.json").read_text())
    assert data["baseline"]["effects"][0]["there"]["values"] == [50.0, 40.0, 60.0]
    assert [v["unit"] for v in data["baseline"]["effect_verdicts"]] == ["points", "epochs"]


def test_controlled_probe_entry_point(tmp_path, capsys):
    from experiments import claims as entry
    a, b = tmp_path / "a", tmp_path / "b"
    for root, extra in ((a, []), (b, ["dataset=shapes_wide"])):
        trainer = FakeTrainer()
        trainer.runs = plan(root, seeds=(0, 1), models=("zf5",), extra=extra)
        grid.run_grid(trainer.runs, trainer)
    args = ["--workdir", str(b), "train=false", "models=zf5", "seeds=0,1", "scale_sides=",
            "dataset=shapes_wide", *TINY]
    for bad, words in (([f"baseline={a}"], "go together"),
                       ([f"baseline={tmp_path / 'c'}", "baseline_keys=dataset=shapes"], "no such directory"),
                       ([f"baseline={a}", "baseline_keys=seed=1"], "set by the grid"),
                       ([f"baseline={a}", "baseline_keys=seeds=1"], "must be training keys"),
                       ([f"baseline={a}", "baseline_keys=dataset=shapes_wide"], "the same as this grid's"),
                       ([f"baseline={a}", "baseline_keys=val_examples=32"], "no run of that grid has finished")):
        with pytest.raises(SystemExit) as e:
            entry.main([*args, *bad])
        assert str(e.value.code).startswith("error: ") and words in str(e.value.code)
    # A baseline with no finished run is refused before anything trains: a fresh grid's
    # workdir is not even created.
    with pytest.raises(SystemExit) as e:
        entry.main(["--workdir", str(tmp_path / "fresh"), "train=true", *args[3:], f"baseline={tmp_path}",
                    "baseline_keys=dataset=shapes"])
    assert "no run of that grid has finished" in str(e.value.code)
    assert not (tmp_path / "fresh").exists()
    entry.main([*args, f"baseline={a}", "baseline_keys=dataset=shapes"])
    out = capsys.readouterr().out
    # The fake errors ignore the dataset, so every gain is the same in both grids.
    assert "Controlled probe: dataset=shapes_wide against dataset=shapes" in out
    data = json.loads((b / "claims.json").read_text())
    assert data["baseline"]["verdicts"] and all(v["diff"] == pytest.approx(0.0)
                                                for v in data["baseline"]["verdicts"])


def test_image_counts_are_read_back_with_the_results(tmp_path):
    """The verdicts' measurement step needs each error's image count: eval.json's num_images,
    else the number of recorded per-image hits, else unknown (0)."""
    (run,) = plan(tmp_path, seeds=(0,), models=("zf5",))[:1]
    report = {"config": grid.config_dict(run.config), "results": {
        "1crop": {"top1_err": 40.0, "top5_err": 5.0, "num_images": 500},
        "multiview": {"top1_err": 30.0, "top5_err": 4.0, "indices": [0, 1, 2],
                      "top1_hits": [1, 0, 1], "top5_hits": [1, 1, 1]},
        "10view": {"top1_err": 35.0, "top5_err": 4.0}}}
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "eval.json"), "w") as f:
        json.dump(report, f)
    r = grid.finished(run)
    assert (r.images_on("1crop"), r.images_on("multiview"), r.images_on("10view")) == (500, 3, 0)
    assert claims.images_of(r, claims.MATCHED) == 3
