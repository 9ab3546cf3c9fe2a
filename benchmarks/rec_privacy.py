"""What the recommender's prototypes reveal (issue 15): can the coordinator guess a user's top genres from the
one 64-float prototype an FCUCR device uploads per period?

    python benchmarks/rec_privacy.py [--data-dir DIR] [--out docs/results]

Uses the converged period-0 SASRec of benchmarks/recommender.py (seed 0, the same cache). Attacks and scores:
coordinator/recsys/leakage.py. Writes rec_privacy.{md,json}.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coordinator.models.recommender import SASRecConfig  # noqa: E402
from coordinator.recsys.data import continual_split, load_ml100k  # noqa: E402
from coordinator.recsys.leakage import load_genres, measure  # noqa: E402
from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec  # noqa: E402
from edge_client.recsys.encoder import load_encoder  # noqa: E402
from export.recommender_export import export_recommender  # noqa: E402

COLUMNS = [("top1_accuracy", "top-1 genre right"), ("true_top1_in_guessed_top3", "true top-1 among 3 guessed"),
           ("top3_overlap", "top-3 overlap")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--periods", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=400)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/recommender-cache")
    args = ap.parse_args(argv)
    console = Console()
    split = continual_split(load_ml100k(args.data_dir), n_periods=args.periods, pretrain_frac=0.5)
    settings = RecTrainSettings(epochs=args.pretrain_epochs, patience=args.patience, seed=0, threads=1)
    model, meta = pretrained_sasrec(split, SASRecConfig(n_items=split.n_items), settings, cache_dir=args.cache,
                                    progress=True)
    encoder, items = load_encoder(export_recommender(model, Path(args.cache) / f"export-{meta['key']}").out_dir)
    result = measure(split, encoder, items, load_genres(args.data_dir))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rec_privacy.json").write_text(json.dumps(result, indent=2) + "\n")
    info = result["meta"]
    title = (f"What an FCUCR prototype reveals: guessing a user's top genres from {info['uploads']} uploaded "
             f"prototypes (MovieLens-100K, 18 genres)")
    table = Table(title=title, header_style="bold")
    lines = [f"# {title}", "", "| attack | users | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for c in ("attack", "users", *[label for _, label in COLUMNS]):
        table.add_column(c)
    for attack, by_group in result.items():
        if attack == "meta":
            continue
        for group, s in by_group.items():
            cells = [attack, f"{group} (n={s['n']})", *[f"{s[k]:.3f}" for k, _ in COLUMNS]]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    lines += ["", f"Baseline = the population's three most frequent top genres ({', '.join(info['crowd_top3'])}) "
              f"for everyone. The probe is trained on {info['probe_training_prototypes']} prototypes the coordinator "
              "computes from its own period-0 data; truth = genre counts over the last "
              f"{info['window']} items a device holds when it uploads (prototype = mean encoder state of the last "
              f"{info['recent']} prefixes)."]
    (out / "rec_privacy.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
