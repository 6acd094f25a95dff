"""The report's statistics: paired differences with bootstrap intervals, selection across a sweep,
convergence flags, and `ia2dist compare` over several run directories."""

import json
from pathlib import Path

import numpy as np
import pytest

from ia2dist.cli import main
from ia2dist.eval import stats
from ia2dist.eval.compare import compare
from ia2dist.eval.metrics import ece_equal_mass
from ia2dist.eval.report import (convergence, paired_comparisons, phase_convergence,
                                 select_settings, write_report)


def _pair(a, b, conf_a=None, conf_b=None) -> stats.SeedPair:
    as_array = (lambda v: None if v is None else np.asarray(v, dtype=float))
    return stats.SeedPair(as_array(a), as_array(b), as_array(conf_a), as_array(conf_b))


# ---------------------------------------------------------------- paired statistics


def test_item_bootstrap_matches_the_hand_computed_distribution():
    """One seed, items A=[1,0] vs B=[0,0]: per-item differences [1,0]. A resample of two items has
    mean difference 0 (both draws item 1: p=1/4), 0.5 (one of each: 1/2) or 1 (1/4); the 95%
    percentile interval of many replicates is then [0, 1]."""
    pairs = [_pair([1, 0], [0, 0])]
    replicates = stats.bootstrap_replicates(pairs, num_bootstrap=8000, seed=3)
    values, counts = np.unique(replicates, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
    result = stats.paired_difference(pairs, num_bootstrap=8000, seed=3)
    assert result.mean == 0.5 and (result.low, result.high) == (0.0, 1.0)
    assert result.per_seed == [0.5] and result.positive == 1 and result.items == [2]
    assert not result.outside_noise


def test_seed_bootstrap_matches_the_hand_computed_distribution():
    """Two seeds whose items all differ by 1 and by 0: only the seed draw varies; the mean of two
    seeds drawn with replacement is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4."""
    pairs = [_pair([1, 1, 1], [0, 0, 0]), _pair([0, 1, 0], [0, 1, 0])]
    replicates = stats.bootstrap_replicates(pairs, num_bootstrap=8000, seed=0)
    values, counts = np.unique(replicates, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
    result = stats.paired_difference(pairs, seed=0)
    assert result.mean == 0.5 and result.per_seed == [1.0, 0.0] and result.positive == 1


def test_bootstrap_is_reproducible_with_its_seed_and_brackets_the_mean():
    rng = np.random.default_rng(7)
    pairs = [_pair(rng.uniform(size=40) < 0.7, rng.uniform(size=40) < 0.5, rng.uniform(size=40),
                   rng.uniform(size=40)) for _ in range(3)]
    for metric in ("accuracy", "ece"):
        first = stats.paired_difference(pairs, metric, seed=11, num_bootstrap=500)
        assert first == stats.paired_difference(pairs, metric, seed=11, num_bootstrap=500)
        assert first.low < first.mean < first.high
        other = stats.paired_difference(pairs, metric, seed=12, num_bootstrap=500)
        assert other.mean == first.mean and (other.low, other.high) != (first.low, first.high)
    # the mean is exactly the mean of the per-seed differences of the plain metrics
    acc = stats.paired_difference(pairs, "accuracy", num_bootstrap=10)
    plain = [p.correct_a.mean() - p.correct_b.mean() for p in pairs]
    assert acc.mean == pytest.approx(np.mean(plain))
    ece = stats.paired_difference(pairs, "ece", num_bootstrap=10, n_bins=5)
    assert ece.per_seed == pytest.approx([
        ece_equal_mass(p.conf_a, p.correct_a, 5) - ece_equal_mass(p.conf_b, p.correct_b, 5)
        for p in pairs])


def test_equal_differences_collapse_the_interval():
    pairs = [_pair([1] * 5, [0] * 5) for _ in range(3)]
    result = stats.paired_difference(pairs)
    assert (result.mean, result.low, result.high) == (1.0, 1.0, 1.0)
    assert result.positive == 3 and result.outside_noise
    same = [_pair([1, 0, 1, 1], [1, 0, 1, 1], [0.9, 0.6, 0.7, 0.8], [0.9, 0.6, 0.7, 0.8])] * 2
    calib = stats.paired_difference(same, "ece")
    assert (calib.mean, calib.low, calib.high) == (0.0, 0.0, 0.0) and not calib.outside_noise
    assert calib.as_dict()["seeds"] == 2 and calib.positive == 0


@pytest.mark.parametrize("items,n_bins", [(23, 5), (4, 15), (30, 15)])
def test_vectorised_ece_equals_ece_equal_mass(items, n_bins):
    rng = np.random.default_rng(items)
    conf = rng.uniform(size=(6, items)).round(1)  # ties: the stable order must match
    correct = (rng.uniform(size=(6, items)) < conf).astype(float)
    got = stats.ece_rows(n_bins)(correct, conf)
    assert got == pytest.approx([ece_equal_mass(c, k, n_bins) for c, k in zip(conf, correct)])


def test_align_pairs_items_by_uid():
    a = [{"uid": "x", "correct": True, "confidence": 0.9}, {"uid": "y", "correct": False,
                                                            "confidence": 0.4},
         {"uid": "only-a", "correct": True, "confidence": 0.5}]
    b = [{"uid": "y", "correct": True, "confidence": 0.7}, {"uid": "x", "correct": False,
                                                            "confidence": 0.2}]
    pair = stats.align(a, b)
    assert pair.correct_a.tolist() == [1.0, 0.0] and pair.correct_b.tolist() == [0.0, 1.0]
    assert pair.conf_b.tolist() == [0.2, 0.7]
    generation = stats.align([{"uid": "x", "correct": True}], [{"uid": "x", "correct": False}])
    assert generation.conf_a is None and generation.correct_a.tolist() == [1.0]
    assert stats.align(a, [{"uid": "z", "correct": True}]) is None


# ---------------------------------------------------------------- a two-point lr sweep

SETTINGS = {"lr0.0001_gt": 1e-4, "lr0.0003_gt": 3e-4}
#: (method, setting) -> items correct out of 10 per seed (seeds 0, 1, 2)
CORRECT = {("sft", "lr0.0001_gt"): (5, 6, 5), ("sft", "lr0.0003_gt"): (6, 6, 7),
           ("ia2_then_sft", "lr0.0001_gt"): (8, 9, 8), ("ia2_then_sft", "lr0.0003_gt"): (7, 7, 7)}
#: (method, setting) -> dev loss (lower: chosen by eval.selection=dev)
DEV_LOSS = {("sft", "lr0.0001_gt"): 0.9, ("sft", "lr0.0003_gt"): 1.1,
            ("ia2_then_sft", "lr0.0001_gt"): 1.0, ("ia2_then_sft", "lr0.0003_gt"): 0.8}


def _history(run: Path, phases: list[dict]) -> None:
    (run / "history.json").write_text(json.dumps({"history": [], "phases": phases}))


def _sweep_run(root: Path, task: str = "sst2", epochs_short: bool = True) -> list[dict]:
    """A run directory as the pipeline writes it for train.lr=[1e-4, 3e-4], methods sft and
    ia2_then_sft, N=4, seeds 0-2, 10 evaluation items: per job folder predictions.json and
    history.json; base without a history. Returns its result rows."""
    rows = []
    for seed in range(3):
        unit = root / f"N4_seed{seed}"
        base = unit / "base"
        base.mkdir(parents=True)
        (base / "predictions.json").write_text(json.dumps(
            [{"uid": f"q{i}", "correct": i < 3, "confidence": 0.5} for i in range(10)]))
        rows.append({"method": "base", "n": 4, "seed": seed, "accuracy": 0.3})
        for (method, setting), correct in CORRECT.items():
            folder = unit / f"{method}-{setting}"
            folder.mkdir()
            k = correct[seed]
            preds = [{"uid": f"q{i}", "correct": i < k, "confidence": 0.9 if i < k else 0.6}
                     for i in range(10)]
            (folder / "predictions.json").write_text(json.dumps(preds))
            last = 6 if epochs_short else 3
            _history(folder, [{"objective": "ia2", "best_step": 4, "best_dev": 0.1,
                               "stopped_early": True, "steps": 5}] * (method == "ia2_then_sft")
                     + [{"objective": "ce", "best_step": last, "best_dev": 1.0,
                         "stopped_early": False, "steps": 6}])
            rows.append({"method": method, "n": 4, "seed": seed, "setting": setting,
                         "lr": SETTINGS[setting], "label_type": "ground_truth",
                         "accuracy": k / 10, "ece": ece_equal_mass(
                             [p["confidence"] for p in preds], [p["correct"] for p in preds]),
                         "dev_loss": DEV_LOSS[(method, setting)],
                         "predictions_path": str(folder / "predictions.json")})
    return rows


def test_selection_picks_one_point_per_method_with_every_candidate(tmp_path):
    rows = _sweep_run(tmp_path)
    kept, choices = select_settings(rows, "test", task="sst2")
    by_method = {c["method"]: c for c in choices}
    assert by_method["sft"]["setting"] == "lr0.0003_gt" and by_method["sft"]["lr"] == 3e-4
    assert by_method["sft"]["candidates"] == pytest.approx({"lr0.0001_gt": 16 / 30,
                                                           "lr0.0003_gt": 19 / 30})
    assert by_method["ia2_then_sft"]["setting"] == "lr0.0001_gt"
    assert len(kept) == 3 + 2 * 3
    _, dev = select_settings(rows, "dev", task="sst2")
    assert {c["method"]: c["setting"] for c in dev} == {"sft": "lr0.0001_gt",
                                                        "ia2_then_sft": "lr0.0003_gt"}
    assert {c["method"]: c["candidates"] for c in dev}["sft"] == {"lr0.0001_gt": 0.9,
                                                                   "lr0.0003_gt": 1.1}


def test_report_of_a_sweep_has_one_row_per_method_and_compares_the_chosen_points(tmp_path):
    write_report(_sweep_run(tmp_path), tmp_path, task="sst2", selection="test",
                 num_bootstrap=400)
    text = (tmp_path / "summary.md").read_text()
    table = text.split("\n\n")[1]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [
        "| base", "| sft", "| ia2_then_sft"]
    assert "| sft | 4 | 3 | ground_truth | lr0.0003_gt | 0.633 ± 0.047 |" in table
    assert "eval.selection = test" in text and "eval.selection = dev (not used above)" in text
    assert "lr0.0001_gt: 0.533, lr0.0003_gt: 0.633" in text
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["selection"]["rule"] == "test"
    assert stored["selection"]["other"]["rule"] == "dev"
    assert {c["method"]: c["setting"] for c in stored["selection"]["other"]["choices"]} == {
        "sft": "lr0.0001_gt", "ia2_then_sft": "lr0.0003_gt"}
    # the paired comparison works on the chosen points: ia2_then_sft at 1e-4 vs sft at 3e-4
    claim = next(p for p in stored["paired"] if p["method"] == "ia2_then_sft")
    assert claim["reference"] == "sft" and claim["label_type"] == "ground_truth"
    assert claim["accuracy"]["per_seed"] == pytest.approx([0.2, 0.3, 0.1])
    assert claim["accuracy"]["mean"] == pytest.approx(0.2) and claim["accuracy"]["positive"] == 3
    assert claim["accuracy"]["low"] > 0 and claim["accuracy"]["outside_noise"]
    assert claim["accuracy"]["items"] == [10, 10, 10]
    # the other rule (dev) is reported with its own paired differences: ia2_then_sft at 3e-4 vs
    # sft at 1e-4
    other = next(p for p in stored["selection"]["other"]["paired"]
                 if p["method"] == "ia2_then_sft")
    assert other["accuracy"]["per_seed"] == pytest.approx([0.2, 0.1, 0.2])
    assert {e["method"]: e["setting"] for e in stored["selection"]["other"]["aggregate"]
            if e["method"] != "base"} == {"sft": "lr0.0001_gt", "ia2_then_sft": "lr0.0003_gt"}
    assert "The paired differences at the points eval.selection = dev chooses:" in text
    assert "| ia2_then_sft − sft | 4 | ground_truth | 3 | +0.167 [" in text
    assert "IA2 -> SFT vs SFT: N=4 (ground_truth labels): accuracy +0.200 [" in text
    assert "(higher, outside the noise; 3/3 seeds > 0)" in text
    assert "## Paired differences" in text
    assert "| ia2_then_sft − sft | 4 | ground_truth | 3 |" in text
    # with the dev rule the table reports the dev choices
    write_report(_sweep_run(tmp_path / "dev"), tmp_path / "dev", task="sst2", selection="dev",
                 num_bootstrap=100)
    dev_text = (tmp_path / "dev" / "summary.md").read_text()
    assert "| sft | 4 | 3 | ground_truth | lr0.0001_gt | 0.533 ± 0.047 |" in dev_text
    assert "Scores: mean dev loss (lower is better)." in dev_text


def test_paired_comparisons_need_the_same_items(tmp_path):
    rows = _sweep_run(tmp_path)
    kept, _ = select_settings(rows, "test")
    for row in kept:  # the reference's predictions are of other items
        if row["method"] == "sft":
            path = Path(row["predictions_path"])
            path.write_text(json.dumps([{**p, "uid": "other" + p["uid"]}
                                        for p in json.loads(path.read_text())]))
    assert [p["method"] for p in paired_comparisons(kept, tmp_path, num_bootstrap=10)] == []


# ---------------------------------------------------------------- convergence


def test_phase_convergence_cases():
    def status(stopped, best):
        return phase_convergence({"stopped_early": stopped, "best_step": best, "steps": 6})

    assert status(True, 3) == "stopped_early"
    assert status(False, 6) == "still_improving"  # best step = last step, at the epoch limit
    assert status(False, 4) == "best_before_limit"
    assert status(False, None) == "no_dev"


def test_report_flags_phases_still_improving_at_the_limit(tmp_path):
    rows = _sweep_run(tmp_path, epochs_short=True)
    jobs = convergence(rows, tmp_path)
    assert len(jobs) == 12  # 4 jobs x 3 seeds; base has no history
    ia2 = next(j for j in jobs if j["job"] == "ia2_then_sft-lr0.0001_gt" and j["seed"] == 0)
    assert [p["status"] for p in ia2["phases"]] == ["stopped_early", "still_improving"]
    assert ia2["setting"] == "lr0.0001_gt" and ia2["num_train"] == 4
    write_report(rows, tmp_path, task="sst2", num_bootstrap=10)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["still_improving"] == 12 and len(stored["convergence"]) == 12
    text = (tmp_path / "summary.md").read_text()
    assert "## Convergence" in text and "**Still improving at the epoch limit**" in text
    assert "| ia2_then_sft-lr0.0001_gt | 4 | 0 | 1 | ce | 6 |" in text
    converged = tmp_path / "converged"
    write_report(_sweep_run(converged, epochs_short=False), converged, task="sst2",
                 num_bootstrap=10)
    assert json.loads((converged / "metrics.json").read_text())["still_improving"] == 0
    text = (converged / "summary.md").read_text()
    assert "Still improving" not in text and "best dev loss before the last step: 12" in text


# ---------------------------------------------------------------- ia2dist compare


def _reported(root: Path, task: str, model: str) -> Path:
    write_report(_sweep_run(root), root, task=task, num_bootstrap=100)
    (root / "config.yaml").write_text(f"model:\n  name_or_path: {model}\n")
    return root


def test_compare_merges_runs_into_one_table_and_figure(tmp_path, capsys):
    one = _reported(tmp_path / "a", "sst2", "tiny:llama")
    two = _reported(tmp_path / "b", "capital_region", "tiny:qwen2")
    out = tmp_path / "cmp" / "comparison.md"
    assert main(["compare", str(one), str(two), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Comparison") and out.read_text().startswith(printed)
    assert ("| tiny:llama | sst2 | test | 4 | ia2_then_sft | ground_truth | lr0.0001_gt | 3 |"
            in printed)
    assert "| tiny:qwen2 | capital_region | test | 4 | sft |" in printed
    assert ("| tiny:qwen2 | capital_region | test | ia2_then_sft − sft | 4 | ground_truth | 3 | "
            "+0.200 [" in printed)
    # and at the points the other rule (dev) chooses
    other = printed.split("## Paired differences under the other selection rule")[1]
    assert ("| tiny:qwen2 | capital_region | dev | ia2_then_sft − sft | 4 | ground_truth | 3 | "
            "+0.167 [" in other)
    assert "| tiny:llama | sst2 | a | 12 | 18 | 12 |" in printed  # convergence per run
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![IA2 -> SFT minus SFT](comparison.png)" in out.read_text()
    # results, paired at both rules' points, convergence
    assert compare([one]).count("| tiny:llama |") == 3 + 1 + 1 + 1


def test_compare_refuses_a_directory_without_a_report(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no metrics.json" in err and "\n" not in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    assert main(["compare", str(tmp_path / "bad")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "bad"), "--out", str(tmp_path / "x.png")]) == 2
    assert "must not end in .png" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- end to end
