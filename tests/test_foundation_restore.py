"""`benchmarks/foundation.py restore`: the finished cells' records committed in docs/results/foundation.json
come back as cell files, so a rerun in a fresh checkout skips them instead of retraining (runs/ is ignored
by git and lost between sessions), and a record already on disk is never overwritten."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import foundation


def _results(path: Path) -> dict:
    data = {"meta": {}, "baselines": {"etth1": {"seasonal_naive": {"H96": {"mse": 0.512}}}},
            "cells": [{"id": "fedavg-share0.2-r2-seed0", "val_mse": 0.616, "cell": {"seed": 0}},
                      {"id": "fedprox-share0.2-seed0", "val_mse": 0.6025, "cell": {"seed": 0}}]}
    path.write_text(json.dumps(data))
    return data


def test_restore_writes_missing_records_and_keeps_existing(tmp_path: Path) -> None:
    results, cells = tmp_path / "foundation.json", tmp_path / "cells"
    data = _results(results)
    cells.mkdir()
    (cells / "fedprox-share0.2-seed0.json").write_text('{"id": "fedprox-share0.2-seed0", "val_mse": 0.5}')

    written = foundation.restore(results, cells)

    assert sorted(written) == ["baselines-etth1.json", "fedavg-share0.2-r2-seed0.json"]
    assert json.loads((cells / "fedavg-share0.2-r2-seed0.json").read_text()) == data["cells"][0]
    assert json.loads((cells / "baselines-etth1.json").read_text()) == data["baselines"]["etth1"]
    assert json.loads((cells / "fedprox-share0.2-seed0.json").read_text())["val_mse"] == 0.5  # not overwritten
    assert sorted(p.name for p in cells.iterdir()) == ["baselines-etth1.json", "fedavg-share0.2-r2-seed0.json",
                                                       "fedprox-share0.2-seed0.json"]  # no temp files left
    assert foundation.restore(results, cells) == []  # idempotent


def test_restore_without_results_file_writes_nothing(tmp_path: Path) -> None:
    assert foundation.restore(tmp_path / "missing.json", tmp_path / "cells") == []
    assert not (tmp_path / "cells").exists()


def test_run_skips_a_cell_whose_record_is_only_in_the_results(tmp_path: Path, monkeypatch) -> None:
    """`run` restores before training: a finished cell is never claimed, trained or evaluated again."""
    out, cells = tmp_path / "results", tmp_path / "runs" / "cells"
    out.mkdir()
    cell = foundation.plan(["main:0"], [0])[1]  # fedavg seed 0
    _results(out / "foundation.json")
    assert cell.id == "fedavg-share0.2-r2-seed0"
    monkeypatch.setattr(foundation, "OUT", out)
    monkeypatch.setattr(foundation, "CELLS", cells)
    monkeypatch.setattr(foundation, "RUNS", tmp_path / "runs")
    trained: list[str] = []

    def train_cell(c: foundation.Cell, threads: int) -> None:
        trained.append(c.id)
        raise RuntimeError(f"retrained {c.id}")

    monkeypatch.setattr(foundation, "train_cell", train_cell)
    monkeypatch.setattr(foundation, "report", lambda args=None: None)
    monkeypatch.setattr(foundation, "plan", lambda groups, seeds: [cell])
    args = foundation.argparse.Namespace(groups=["main:0"], seeds=[0], threads=1)

    foundation.run(args)

    assert trained == []
    assert (cells / f"{cell.id}.json").is_file()


def test_run_starts_no_cell_that_would_not_finish_before_until(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--until`: the estimate is the median wall time of finished cells at the same budget; a new cell that
    would end after the deadline is not started (so no session leaves a half-trained cell behind)."""
    cells = tmp_path / "runs" / "cells"
    cells.mkdir(parents=True)
    for i, wall in enumerate((1200.0, 1500.0, 9000.0)):
        (cells / f"c{i}.json").write_text(json.dumps({"id": f"c{i}", "windows_seen": foundation.WINDOWS,
                                                      "wall_s": wall}))
    monkeypatch.setattr(foundation, "OUT", tmp_path)
    monkeypatch.setattr(foundation, "CELLS", cells)
    cell = foundation.plan(["seed:0"], [0])[0]
    assert foundation.cell_estimate_s(cell) == 1500.0
    assert foundation.cell_estimate_s(foundation.Cell("x", "x", "centralized", 0, windows=2 * foundation.WINDOWS)) \
        == 2 * 1500.0  # no record at that budget: scaled per window
    now = foundation.time.time()
    hhmm = foundation.time.strftime("%H:%M", foundation.time.gmtime(now + 1200))  # 20 min from now
    assert 0 < foundation.until_epoch(hhmm) - now <= 1260
    monkeypatch.setattr(foundation, "train_cell", lambda c, threads: (_ for _ in ()).throw(RuntimeError(c.id)))
    monkeypatch.setattr(foundation, "plan", lambda groups, seeds: [cell])
    foundation.run(foundation.argparse.Namespace(groups=["seed:0"], seeds=[0], threads=1, until=hhmm))
    assert "would not finish" in capsys.readouterr().out
    assert not (cells / f"{cell.id}.lock").exists()


def test_cells_of_the_superseded_recipe_keep_their_ids_and_stay_out_of_the_current_tables() -> None:
    """Recipe 1 records (written before recipes had names) keep their ids and are not averaged with the
    current recipe's cells of the same label; they are reported in their own section."""
    current = foundation.plan(["main:1"], [1])[0]
    assert current.id == f"centralized-share0.2-r{foundation.RECIPE}-seed1"
    assert foundation.Cell("main", "centralized", "centralized", 1, recipe=1).id == "centralized-share0.2-seed1"

    def record(recipe: int | None, val: float) -> dict:
        cell = {"group": "main", "label": "centralized", "strategy": "centralized", "seed": 1, "hparams": [],
                "share": foundation.SHARE, "held_out": list(foundation.ALWAYS_HELD_OUT),
                "windows": foundation.WINDOWS, "rounds": foundation.ROUNDS, "full_eval": False}
        if recipe is not None:
            cell["recipe"] = recipe
        return {"id": f"c{recipe}", "cell": cell, "val_mse": val, "best_round": 3, "windows_seen": 1, "train_s": 1.0,
                "eval_s": 1.0, "history": [], "scores": {"in_domain": {}, "zero_shot": {}}, "dead_features": 0}

    md = foundation.render([record(None, 0.693), record(foundation.RECIPE, 0.554)], {})
    current_table = md[md.index("## Strategies"):md.index("## Training recipe")]
    superseded = md[md.index("## Superseded"):md.index("## Cells")]
    assert "0.554" in current_table and "0.693" not in current_table
    assert "0.693" in superseded and "0.554" not in superseded
    recipes = md[md.index("## Training recipe"):md.index("## Standard protocol")]
    assert "| 1 | 0.001 | 0 | 0.6930 |" in recipes and f"| {foundation.RECIPE} (chosen) |" in recipes


def test_smaller_client_batches_spend_the_same_windows_in_more_local_steps() -> None:
    """Group "batch" trades batch size for sequential steps at the grid's budget; its cells are named by their
    batch and never pooled with the default cells."""
    default = foundation.Cell("main", "fedavg", "fedavg", 0)
    for cell in foundation.plan(["batch:0"], [0]):
        s, d = cell.settings(6), default.settings(6)
        assert s.rounds * s.local_steps * s.batch_size == d.rounds * d.local_steps * d.batch_size
        assert s.local_steps * s.batch_size == d.local_steps * d.batch_size and s.local_steps > d.local_steps
        assert f"-b{cell.batch}" in cell.id
        assert not foundation.default_cell(asdict(cell))
    assert foundation.default_cell(asdict(default)) and "-b" not in default.id


def test_the_per_dataset_table_shows_where_a_validation_gap_is() -> None:
    """Records with each dataset's validation MSE get a row (full corpus only); older records are skipped."""
    def record(label: str, held_out: tuple[str, ...], by_dataset: dict | None) -> dict:
        cell = {"label": label, "seed": 0, "held_out": list(held_out)}
        rec = {"cell": cell, "val_mse": float(np.mean(list(by_dataset.values()))) if by_dataset else 0.6}
        return {**rec, "val_by_dataset": by_dataset} if by_dataset else rec

    lines = foundation.per_dataset_table([
        record("centralized, batch 8", foundation.ALWAYS_HELD_OUT, {"etth1": 1.148, "temperatures": 0.500}),
        record("fedavg, batch 8", foundation.ALWAYS_HELD_OUT, {"etth1": 1.169, "temperatures": 0.694}),
        record("lodo", (*foundation.ALWAYS_HELD_OUT, "energy"), {"temperatures": 0.4}),
        record("old", foundation.ALWAYS_HELD_OUT, None),
    ])
    table = "\n".join(lines)
    assert "| cell | seed | etth1 | temperatures | mean |" in table
    assert "| fedavg, batch 8 | 0 | 1.169 | 0.694 | 0.9315 |" in table
    assert "lodo" not in table and "old" not in table
    assert foundation.per_dataset_table([record("old", foundation.ALWAYS_HELD_OUT, None)]) == []


def test_a_cell_that_takes_an_always_held_out_domain_in_is_named_by_it_and_trains_on_it() -> None:
    """The left-out-energy cell with exchange rates in trains on finance and says so in its id; every other cell
    keeps finance out and its id is what it was."""
    (cell,) = foundation.plan(["lodofinance"], [0])
    assert "finance" in cell.domains and "energy" not in cell.domains
    assert "-noenergy-withfinance-" in cell.id
    plain = foundation.lodo_cells()[0]
    assert "finance" not in plain.domains and plain.id == "centralized-share0.2-noenergy-r2-seed0"


def test_a_seed_ensemble_forecasts_the_mean_of_its_members() -> None:
    import torch

    from coordinator.models.tsfm import TSFM, TSFMConfig
    from coordinator.models.tsfm import forecast as predict

    cfg = TSFMConfig(context=32, horizon=8, patch_len=8, stride=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                     feature_dim=8)
    members = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        members.append(TSFM(cfg).eval())
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    point, quant = predict(foundation.MeanForecast(members), x)
    outs = [predict(m, x) for m in members]
    np.testing.assert_allclose(point, np.mean([p for p, _ in outs], axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(quant, np.mean([q for _, q in outs], axis=0), rtol=1e-5, atol=1e-6)
    cells = foundation.ensemble_members()[0]
    assert [c.seed for c in cells] == list(foundation.ENSEMBLE_SEEDS)
    assert len({c.id for c in cells}) == len(cells) and len({c.label for c in cells}) == 1
    assert foundation.ensemble_id(cells).startswith("ensemble-centralized-share0.2-noenergy-b8-r2")
