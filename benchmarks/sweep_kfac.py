"""K-FAC option sweep (loss only): for each problem, option value, lr and seed, one
training run with hpcqn.experiments.training.train (the jobs' epochs, batch 64, cosine
schedule), appending one JSON line per run to OUT. The sweep behind K-FAC's default
damping (docs/algorithms.md 4.5; its lines: benchmarks/results/kfac_damping.jsonl)::

    python benchmarks/sweep_kfac.py OUT.jsonl mlp,cnn,ae,deep_ae damping \
        1e-4,1e-3,1e-2,0.03,0.1,0.3,1 0.01,0.03,0.1,0.3,1 0,1
"""
import contextlib
import io
import json
import math
import sys
import time
import warnings

import torch
from torch import nn

import hpcqn
import hpcqn.experiments.training as tr

torch.set_num_threads(1)
_make = tr.make_model


def make_model(name, hidden=128, seed=0, dtype=torch.float32):
    if name == "autoencoder" and hidden == 256:  # the deep one: 64-256-128-32-128-256-64
        torch.manual_seed(seed)
        w = [64, 256, 128, 32, 128, 256, 64]
        layers = []
        for i, (a, b) in enumerate(zip(w, w[1:], strict=False)):
            layers += [nn.Linear(a, b), nn.Sigmoid() if i == len(w) - 2 else nn.Tanh()]
        return nn.Sequential(nn.Flatten(), *layers).to(dtype)
    return _make(name, hidden, seed, dtype)


tr.make_model = make_model
# problem -> (model name, hidden, epochs): the job files' digits_mlp, digits_cnn,
# digits_autoencoder, and the deep autoencoder
PROBLEMS = {"mlp": ("mlp", 128, 15), "cnn": ("cnn", 128, 15),
            "ae": ("autoencoder", 32, 20), "deep_ae": ("autoencoder", 256, 20)}


def run(problem, options, seed):
    model, hidden, epochs = PROBLEMS[problem]
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = tr.train("kfac", hpcqn.serial_comm(), model_name=model, options=options,
                           epochs=epochs, batch_size=64, seed=seed, lr_schedule="cosine",
                           log=False, hidden=hidden)
        rec = out["records"][-1]
        loss = rec["train_loss"] if math.isfinite(rec["train_loss"]) else math.inf
        extra = {k: rec[k] for k in ("test_accuracy", "test_loss") if k in rec}
        err = None
    except Exception as exc:  # noqa: BLE001
        loss, extra, err = math.inf, {}, f"{type(exc).__name__}: {exc}"[:200]
    return {"problem": problem, "seed": seed, **options, "train_loss": loss, **extra,
            "error": err, "seconds": time.perf_counter() - t}


if __name__ == "__main__":
    out_path, problems, key, values, lrs, seeds = (sys.argv[1], sys.argv[2].split(","),
                                                  sys.argv[3], sys.argv[4].split(","),
                                                  sys.argv[5].split(","), sys.argv[6].split(","))
    base = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    for problem in problems:
        for v in values:
            for lr in lrs:
                for seed in seeds:
                    opts = {**base, key: (int(v) if key.endswith("freq") else float(v)),
                            "lr": float(lr)}
                    r = run(problem, opts, int(seed))
                    with open(out_path, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(json.dumps(r), flush=True)
