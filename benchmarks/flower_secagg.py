"""Flower's SecAgg+ against Flower's plain FedAvg on fedge's head-only task: the measured side of the comparison in
benchmarks/privacy.py (its ``flower`` cells run this script in a subprocess, one per client count and mode).

    python benchmarks/flower_secagg.py --clients 100 --size 6240 --secagg --out result.json

Flower is a benchmark-only dependency (``pip install 'fedge[bench]'``); nothing in fedge imports it. Both modes use
the same path so that the ratio secure / plain is Flower's own overhead: the legacy ServerApp with a
``DefaultWorkflow`` and ``flwr.server.strategy.FedAvg``, its fit stage either ``default_fit_workflow`` (plain) or
``SecAggPlusWorkflow`` (secure, with the client mod ``secaggplus_mod``; num_shares and reconstruction threshold set as
fedge's Harary graph sets them: k neighbours from edge_client.secagg.graph.degree, so num_shares = k + 1 counting
the client itself, threshold t = k//2 + 1). Like fedge's
in-process cost cells (benchmarks/privacy.py ``cost_cell``), each client returns the shipped head plus a seeded
N(0, 0.05) delta of the head's size (no training: the cost of aggregation alone is measured).

Measured per fit round: wall time (from the fit workflow's start to its end, Flower's simulation over Ray), the
server thread's CPU time (``time.thread_time`` in the ServerApp thread: for SecAgg+ the key relay, share routing,
Shamir reconstruction and unmasking), and the bytes each client sent (the serialised protobuf of every reply's
content, summed over the workflow's stages, divided by the clients).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROUNDS: list[dict] = []  # per fit round, filled in the ServerApp thread


class CountingGrid:
    """Delegates to Flower's grid; counts the bytes of every reply's content (what the clients sent)."""

    def __init__(self, grid, counter: dict) -> None:  # type: ignore[no-untyped-def]
        self._grid, self._counter = grid, counter

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.common.serde import recorddict_to_proto

        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_content():
                self._counter["bytes"] += recorddict_to_proto(r.content).ByteSize()
                self._counter["replies"] += 1
        return replies


def build_apps(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    from edge_client.learning.head import HEAD_KEYS, slice_head
    from edge_client.secagg.graph import degree, threshold

    with np.load(Path(args.model) / "head.npz") as data:
        head = slice_head({k: data[k] for k in HEAD_KEYS}, args.horizon)
    arrays = [head[k].astype(np.float32) for k in HEAD_KEYS]
    size = sum(a.size for a in arrays)

    class HeadClient(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            rng = np.random.default_rng(self.cid)
            out = [p + rng.normal(0, 0.05, p.shape).astype(np.float32) for p in parameters]
            return out, 100, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return HeadClient(int(context.node_config["partition-id"])).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if args.secagg else [])
    server = ServerApp()

    @server.main()
    def main(grid, context: Context) -> None:  # type: ignore[no-untyped-def]
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
                          min_available_clients=args.clients, initial_parameters=ndarrays_to_parameters(arrays))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=args.rounds), strategy=strategy)
        k = degree(args.clients)  # Flower's num_shares counts the client itself: k neighbours + 1
        inner = SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=threshold(k)) if args.secagg \
            else default_fit_workflow

        def timed_fit(grid, context) -> None:  # type: ignore[no-untyped-def]
            counter = {"bytes": 0, "replies": 0}
            t0, c0 = time.perf_counter(), time.thread_time()
            inner(CountingGrid(grid, counter), context)
            ROUNDS.append({"round_s": time.perf_counter() - t0, "server_cpu_s": time.thread_time() - c0,
                           "bytes_per_client": counter["bytes"] / args.clients, "replies": counter["replies"]})

        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    return server, client, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--secagg", action="store_true")
    ap.add_argument("--model", required=True, help="export folder (head.npz)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import flwr
    from flwr.simulation import run_simulation

    server, client, size = build_apps(args)
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.cpus, "include_dashboard": False}})
    if len(ROUNDS) < args.rounds:
        raise SystemExit(f"Flower finished {len(ROUNDS)} of {args.rounds} fit rounds")
    args.out.write_text(json.dumps({"clients": args.clients, "secagg": args.secagg, "size": size,
                                    "rounds": ROUNDS, "wall_s": time.perf_counter() - t0,
                                    "flwr": flwr.__version__}))


if __name__ == "__main__":
    main()
