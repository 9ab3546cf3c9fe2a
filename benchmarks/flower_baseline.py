"""Flower's simulation engine on fedge's head-only task: the side-by-side baseline of benchmarks/fleet_scale.py.

    python benchmarks/flower_baseline.py --clients 100 --rounds 3 --model DIR --bank DIR --out result.json

Flower is a benchmark-only dependency (``pip install 'fedge[bench-flower]'``, i.e. ``flwr[simulation]``); nothing in
fedge imports it. The task is exactly the emulated fleet's: client i holds the same slice of real windows as
emulated device i (the shared feature bank), trains the same linear point + quantile head with the same numpy
learner (:class:`edge_client.learning.learner.DeviceLearner`, one epoch, the same batch size and learning rate),
and Flower's FedAvg (Message API, Ray backend) averages the trained heads weighted by sample count. Round time is
measured from Flower's ``configure_train`` to the end of its ``aggregate_train`` (its own round loop; no network,
no broker, no database), so it is the same span as a fedge round opened -> closed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROUND_TIMES: list[tuple[float, float]] = []  # (configure_train, aggregate_train end), per round, in the server process
_LEARNERS: dict = {}  # per Ray worker process: client id -> learner


def _learner(bank_dir: str, backbone: str, n_clients: int, cid: int, horizon: int):  # type: ignore[no-untyped-def]
    from coordinator.loadtest.bank import FeatureBank
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.runtime.backbone import BackboneRunner

    key = (bank_dir, n_clients, cid)
    if key not in _LEARNERS:
        if "bank" not in _LEARNERS:
            _LEARNERS["bank"] = FeatureBank.load(bank_dir)
            _LEARNERS["backbone"] = BackboneRunner(backbone, threads=1)
        bank = _LEARNERS["bank"]
        slices, _ = bank.plan(n_clients, 96, 8)
        _LEARNERS[key] = DeviceLearner.from_features(_LEARNERS["backbone"], split=SplitConfig(horizon=horizon),
                                                     **bank.device_data(slices[cid]))
    return _LEARNERS[key]


def build_apps(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from edge_client.learning.head import HEAD_KEYS, slice_head

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        learner = _learner(args.bank, str(Path(args.model) / "backbone.onnx"), args.clients, cid, args.horizon)
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        head = dict(zip(HEAD_KEYS, arrays, strict=True))
        out = learner.run_round(head, epochs=1, lr=3e-3, batch_size=64, seed=cid, upload_dtype="float32")
        trained = [head[k] + out.delta[k] for k in HEAD_KEYS]
        content = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=trained),
                              "metrics": MetricRecord({"num-examples": out.n_samples})})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            ROUND_TIMES.append((time.perf_counter(), float("nan")))
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            result = super().aggregate_train(server_round, replies)
            ROUND_TIMES[-1] = (ROUND_TIMES[-1][0], time.perf_counter())
            return result

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        with np.load(Path(args.model) / "head.npz") as data:
            head = slice_head({k: data[k] for k in HEAD_KEYS}, args.horizon)
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=args.clients,
                               min_available_nodes=args.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(numpy_ndarrays=[head[k].astype(np.float32)
                                                                            for k in HEAD_KEYS]),
                       num_rounds=args.rounds)

    return server, client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--model", required=True, help="export folder (backbone.onnx, head.npz)")
    ap.add_argument("--bank", required=True, help="feature bank folder (coordinator.loadtest.bank)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    from flwr.simulation import run_simulation

    server, client = build_apps(args)
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.cpus, "include_dashboard": False}})
    rounds = [b - a for a, b in ROUND_TIMES if b == b]
    import flwr

    args.out.write_text(json.dumps({"clients": args.clients, "rounds": len(rounds), "round_s": rounds,
                                    "wall_s": time.perf_counter() - t0, "flwr": flwr.__version__}))


if __name__ == "__main__":
    main()
