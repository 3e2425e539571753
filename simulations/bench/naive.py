"""The naive per-client loop every engine is measured against (a whole process of its own).

``python -m simulations.bench.naive '<workload json>'`` loads the same data, draws the same
participation (availability process or seeded selection) and trains every client of a round in
turn with plain torch (:func:`fedagg.training.local_sgd`, one model loaded in place, one BLAS
thread as in a 1-CPU worker), averages the local models weighted by examples, evaluates on the
server test set every ``eval_every`` rounds, and prints ``{"loop_seconds", "accuracy"}`` as JSON.
No Flower, no Ray, no records: what a researcher would write by hand.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedagg.data import load_federated
from fedagg.models import build_model
from fedagg.participation import build_probabilities, build_process
from fedagg.rng import numpy_rng, torch_generator
from fedagg.training import LocalTrainConfig, evaluate, load_numpy_state, local_sgd, state_to_numpy


def naive_loop(w: dict[str, Any]) -> dict[str, float]:
    """Run workload ``w`` (run-config keys) as a plain loop; ``loop_seconds`` excludes set-up."""
    seed, n = int(w.get("seed", 0)), int(w["num_clients"])
    stream = np.random.RandomState(seed % 2**32)
    part_args = dict(w.get("partition_args") or {})
    if w.get("alpha") is not None:
        part_args["alpha"] = w["alpha"]
    data = load_federated(w.get("dataset", "mnist1d"), n, seed, partition=w.get("partition", "iid"),
                          partition_args=part_args, dataset_args=w.get("dataset_args") or {},
                          test_fraction=float(w.get("test_fraction", 0.2)), rng=stream)
    part = w.get("participation") or {"process": "always"}
    process = None
    if part.get("process", "always") != "always":
        p = build_probabilities(part.get("probabilities", {"kind": "heterogeneous"}), n,
                                histograms=data.label_histograms(), rng=stream)
        process = build_process(part["process"], p, stream, first_round=1, **part.get("args", {}))
    model = build_model(w.get("model", "mlp"), data.input_shape, data.num_classes, seed, w.get("model_args"))
    xt, yt = torch.as_tensor(data.test.x), torch.as_tensor(data.test.y)
    cfg = LocalTrainConfig(steps=int(w["local_steps"]), lr=float(w["lr"]), batch_size=int(w["batch_size"]))
    global_state = state_to_numpy(model)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    acc = float("nan")
    rounds, every = int(w["rounds"]), int(w.get("eval_every", 1))
    for rnd in range(1, rounds + 1):
        if process is not None:
            chosen = [int(c) for c in process.available(rnd)]
        elif w.get("clients_per_round"):
            chosen = sorted(int(c) for c in numpy_rng(seed, "select", rnd).choice(
                n, int(w["clients_per_round"]), replace=False))
        else:
            chosen = list(range(n))
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_state.items()}
        weight = 0
        torch.set_num_threads(1)
        for cid in chosen:
            train, _ = data.client(cid)
            x, y = torch.as_tensor(train.x), torch.as_tensor(train.y)
            load_numpy_state(model, global_state)
            local_sgd(model, x, y, cfg, torch_generator(seed, "local-train", rnd, cid))
            for k, v in state_to_numpy(model).items():
                total[k] += len(y) * v
            weight += len(y)
        torch.set_num_threads(threads)
        if weight > 0:
            global_state = {k: (v / weight).astype(np.float32) for k, v in total.items()}
        if rnd % every == 0 or rnd == rounds:
            load_numpy_state(model, global_state)
            _, acc = evaluate(model, xt, yt)
    return {"loop_seconds": time.perf_counter() - t0, "accuracy": acc}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    print(json.dumps(naive_loop(json.loads(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
