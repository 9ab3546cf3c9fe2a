"""Fuzz benchmark of the wire: >= 100,000 hostile messages through decode and a receiver, by reason.

The cases are mutations of a signed message of every type (tests/fuzzing.py: bytes flipped, cut and spliced; a
field replaced by a value of another type, a huge integer, an array; the header confused) plus raw random bytes.
Each goes through ``Receiver.accept`` (decode, topic identity, replay checks): it must come back as a message or a
typed ProtocolError; anything else is a crash (must be 0). Time and memory (tracemalloc peak) are measured per
message and the worst are reported.

    python benchmarks/fuzz.py [--cases 100000] [--seed 0] [--out docs/results]

Writes fuzz.json and fuzz.md (hand-written notes below the marker line are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edge_client import wire as P
from tests.fuzzing import FLEET, mutate, samples

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.getLogger("fedge").setLevel(logging.ERROR)  # every refusal logs a warning; counted here instead
    rng = random.Random(args.seed)
    payloads = {name: P.encode(msg) for name, msg in samples().items()}
    names = sorted(payloads)
    topics = P.Topics(FLEET)
    receiver = P.Receiver("fuzz")
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    worst_s, worst_kb, worst_s_case, worst_kb_case = 0.0, 0.0, "", ""
    tracemalloc.start()
    for i in track(range(args.cases), description="fuzzing", transient=True):
        name = names[i % len(names)]
        if i % 10 == 9:
            payload = rng.randbytes(rng.randrange(1, 1024))
        else:
            payload = payloads[name]
            for _ in range(rng.randrange(1, 4)):
                payload = mutate(payload, rng)
        topic = rng.choice([topics.update(1, "dev-1"), topics.hello("dev-1"), topics.task("dev-1"),
                            topics.global_model("tsfm")])
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        try:
            msg = receiver.accept(topic, payload, topics)
            outcomes[f"accepted {msg.type}"] += 1
        except P.ProtocolError as err:
            outcomes[err.reason] += 1
        except Exception as exc:  # a crash: what the receive path must never produce
            crashes.append(f"{type(exc).__name__}: {exc} ({payload[:40]!r})")
        dt = time.perf_counter() - t0
        kb = (tracemalloc.get_traced_memory()[1] - base) / 1024
        if dt > worst_s:
            worst_s, worst_s_case = dt, f"{name} ({len(payload)} bytes)"
        if kb > worst_kb:
            worst_kb, worst_kb_case = kb, f"{name} ({len(payload)} bytes)"
    tracemalloc.stop()
    result = {"cases": args.cases, "seed": args.seed, "crashes": len(crashes), "crash_examples": crashes[:10],
              "outcomes": dict(outcomes.most_common()), "worst_ms": worst_s * 1e3, "worst_ms_case": worst_s_case,
              "worst_peak_kb": worst_kb, "worst_peak_case": worst_kb_case}
    table = Table(title=f"fuzz: {args.cases:,} hostile messages through Receiver.accept")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for k, v in outcomes.most_common():
        table.add_row(k, f"{v:,}")
    table.add_row("[bold]crashes (must be 0)", f"{len(crashes)}")
    console = Console()
    console.print(table)
    console.print(f"worst time {worst_s * 1e3:.2f} ms ({worst_s_case}); worst memory peak {worst_kb:.0f} KB "
                  f"({worst_kb_case})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    md = args.out / "fuzz.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    lines = [f"# Fuzzing the wire: {args.cases:,} hostile messages", "",
             "Mutations of a signed message of every type (tests/fuzzing.py) and raw random bytes (every 10th case), "
             "through `Receiver.accept` (decode, topic identity, replay checks). `python benchmarks/fuzz.py`.", "",
             "| outcome | count |", "|---|---:|", *[f"| {k} | {v:,} |" for k, v in outcomes.most_common()],
             f"| **crashes (must be 0)** | {len(crashes)} |", "",
             f"Worst time per message: {worst_s * 1e3:.2f} ms ({worst_s_case}); worst memory peak per message "
             f"(tracemalloc): {worst_kb:.0f} KB ({worst_kb_case}).", ""]
    md.write_text("\n".join(lines) + f"\n{NOTES_MARKER}" + (notes or "\n"))
    if crashes:
        sys.exit(1)


if __name__ == "__main__":
    main()
