"""The demo's default backbone: the benchmark's best exportable strategy read from its results file,
with clear fallbacks, and a cached pretraining that is not repeated (tiny config, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.models.tsfm import TSFMConfig
from coordinator.pretrain import backbone
from coordinator.pretrain.backbone import (
    DEMO_HOLDOUT,
    FALLBACK_STRATEGY,
    BackboneBudget,
    BackboneChoice,
    check_requested,
    choose_backbone,
    pretrained_backbone,
    ranked_best,
)
from coordinator.pretrain.silos import available_domains

ALL_DOMAINS = ["energy", "finance", "air_quality", "traffic", "weather", "nature"]


def _results(tmp_path, best: object = "fedavg", complete: bool = True):
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps({"meta": {"best_exportable": best, "complete": complete}, "summary": {}}))
    return path


@pytest.fixture
def domains(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend every domain's data is here: the rule is under test, not the data directory."""
    found = list(ALL_DOMAINS)
    monkeypatch.setattr(backbone, "available_domains", lambda data_dir=None: found)
    return found


def test_picks_the_strategy_the_results_file_ranks_best(tmp_path, domains) -> None:
    choice = choose_backbone(results=_results(tmp_path, "fedprox"))
    assert choice.strategy == "fedprox"
    assert "ranked best" in choice.reason and "pretrain.json" in choice.reason
    assert "finance" not in choice.domains and choice.held_out == DEMO_HOLDOUT  # exchange-rate devices stay unseen
    assert set(choice.domains) == set(ALL_DOMAINS) - set(DEMO_HOLDOUT)
    assert "etth1" in choice.datasets and "exchange_rate" not in choice.datasets
    assert "fedprox over energy (etth1, electricity)" in choice.describe()


def test_the_checked_in_results_name_an_exportable_strategy() -> None:
    if not backbone.RESULTS_JSON.is_file():
        pytest.skip("docs/results/pretrain.json is not part of this installation")
    best = ranked_best()
    assert best == json.loads(backbone.RESULTS_JSON.read_text())["meta"]["best_exportable"]
    check_requested(best)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no benchmark results"),
    (b"\x00\x01 not json", "not a readable benchmark result"),
    (b'{"summary": {}}', "not a readable benchmark result"),
    ("partial", "partial benchmark run"),
    ("telepathy", "unknown strategy"),
    ("fedpm", "ONNX backbone does not compute"),
])
def test_falls_back_when_the_results_file_is_missing_or_unusable(tmp_path, domains, content, message,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pretrain.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "partial":
        _results(tmp_path, "fedavg", complete=False)
    elif content is not None:
        _results(tmp_path, content)
    with caplog.at_level("WARNING", logger="coordinator.pretrain.backbone"):
        choice = choose_backbone(results=path)
    assert choice.strategy == FALLBACK_STRATEGY
    assert choice.reason.startswith("fallback") and message in choice.reason
    assert message in caplog.text
    with pytest.raises(ValueError, match=message):
        ranked_best(path)


def test_without_multi_domain_data_it_falls_back_to_etth1(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone, "available_domains", lambda data_dir=None: ["finance"])  # all held out
    choice = choose_backbone(results=_results(tmp_path, "fedavg"))
    assert choice.strategy == "etth1" and choice.datasets == ("etth1",)
    assert "no multi-domain datasets" in choice.reason


def test_an_explicit_strategy_overrides_the_results_file(tmp_path, domains) -> None:
    choice = choose_backbone("fedal", results=_results(tmp_path, "fedavg"))
    assert choice.strategy == "fedal" and "requested" in choice.reason
    assert choose_backbone("etth1", results=_results(tmp_path, "fedavg")).strategy == "etth1"
    with pytest.raises(ValueError, match="cannot be the demo's backbone"):
        choose_backbone("fedpm")
    with pytest.raises(ValueError, match="unknown pretraining strategy"):
        choose_backbone("magic")


def test_silo_backbone_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "nature" not in available_domains():
        pytest.skip("sunspots (the smallest silo) is not in the data directory")
    cfg = TSFMConfig(context=32, horizon=8, patch_len=8, stride=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                     feature_dim=8)
    choice = BackboneChoice("centralized", "test", ("nature",), DEMO_HOLDOUT)
    budget = BackboneBudget(rounds=1, local_steps=2, batch_size=8)
    model, meta = pretrained_backbone(choice, cfg, tmp_path, budget=budget, threads=1)
    cached = list(tmp_path.glob("tsfm-centralized-*.pt"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.round.pt"))  # the resume file is cleaned up
    assert meta["strategy"] == "centralized" and meta["datasets"] == ["sunspots"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached backbone must be loaded, not retrained")

    monkeypatch.setattr("coordinator.pretrain.federated.run_federated", no_training)
    again, meta2 = pretrained_backbone(choice, cfg, tmp_path, budget=budget, threads=1)
    assert meta2["val_mse"] == meta["val_mse"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    monkeypatch.undo()

    cached[0].write_bytes(b"truncated")  # a corrupt cache file is retrained over, not a crash
    retrained, _ = pretrained_backbone(choice, cfg, tmp_path, budget=budget, threads=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, retrained.state_dict()[k]), k  # seeded: the same weights again
