"""A small built-in trainer: linear regression on CSV partitions with DDP.

CSV columns: ``id`` (a row identifier), the features, and ``y`` last. Hyper-
parameters: ``lr`` (0.05), ``epochs`` (5), ``batch_size`` (16), ``seed`` (0),
``dump_dir`` (write per-rank row ids and weights after the first step, for checks),
``epoch_seconds`` (a pause per epoch, to interrupt a demo).
Rank 0 saves a checkpoint per epoch (a restarted job resumes from the last one), then
the model (a state dict of ``torch.nn.Linear``) and model-settings.json; every rank
reports the all-reduced mean loss.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from meshserve.adapters import worker


def read_rows(
    files: list[str], rank: int, world: int, by_row: bool
) -> tuple[list[str], list[list[float]], list[float]]:
    ids: list[str] = []
    xs: list[list[float]] = []
    ys: list[float] = []
    i = 0
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                keep = (i % world == rank) if by_row else True
                i += 1
                if not keep:
                    continue
                ids.append(row.pop("id"))
                ys.append(float(row.pop("y")))
                xs.append([float(v) for v in row.values()])
    return ids, xs, ys


def train() -> int:
    import torch
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel

    dist = worker.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hp = worker.hyperparameters()
    torch.manual_seed(int(hp.get("seed", 0)))
    torch.set_num_threads(1)
    ids, xs, ys = read_rows(worker.partition(), rank, world, worker.row_shard())
    if not xs:
        raise SystemExit(f"rank {rank}: no data in my partition")
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.float32).unsqueeze(1)
    model = DistributedDataParallel(nn.Linear(x.shape[1], 1))
    opt = torch.optim.SGD(model.parameters(), lr=float(hp.get("lr", 0.05)))
    bs = int(hp.get("batch_size", 16))
    # Every rank must take the same number of steps or the all-reduce waits forever.
    steps = torch.tensor([(len(xs) + bs - 1) // bs])
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    loss_fn = nn.MSELoss()
    dump = hp.get("dump_dir")
    before: dict[str, list[float]] = {}
    local_grad: dict[str, list[float]] = {}
    if dump:  # this rank's own gradient of the first batch, outside DDP (no all-reduce)
        inner = model.module
        grads = torch.autograd.grad(loss_fn(inner(x[:bs]), y[:bs]), list(inner.parameters()))
        names = [n for n, _ in inner.named_parameters()]
        local_grad = {n: g.flatten().tolist() for n, g in zip(names, grads, strict=True)}
        before = {n: p.detach().flatten().tolist() for n, p in inner.named_parameters()}
    start = 0
    checkpoint = worker.resume_from()
    if checkpoint is not None:  # a restart interrupted this job: carry on from its last epoch
        state = torch.load(checkpoint, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        print(f"resumed from {checkpoint.name}: epochs {start}..", flush=True)
    for epoch in range(start, int(hp.get("epochs", 5))):
        for s in range(int(steps)):
            opt.zero_grad()
            loss = loss_fn(model(x[s * bs : (s + 1) * bs]), y[s * bs : (s + 1) * bs])
            loss.backward()
            opt.step()
            if dump and epoch == 0 and s == 0:
                Path(dump).mkdir(parents=True, exist_ok=True)
                after = {n: p.detach().flatten().tolist() for n, p in model.module.named_parameters()}
                doc = {"rank": rank, "world": world, "ids": ids, "files": worker.partition(), "before": before,
                       "local_grad": local_grad, "after": after, "lr": float(hp.get("lr", 0.05))}  # fmt: skip
                (Path(dump) / f"rank-{rank}.json").write_text(json.dumps(doc))
        if rank == 0:  # every rank holds the same weights: one checkpoint per epoch
            state = {"epoch": epoch, "model": model.module.state_dict(), "optimizer": opt.state_dict()}
            worker.save_checkpoint(lambda p, state=state: torch.save(state, p), f"epoch-{epoch}.pt")
        print(f"epoch={epoch}", flush=True)
        if hp.get("epoch_seconds"):  # slows a demo or a test down enough to interrupt it
            time.sleep(float(hp["epoch_seconds"]))
    with torch.no_grad():
        total = torch.tensor([float(loss_fn(model(x), y)) * len(xs), float(len(xs))])
    dist.all_reduce(total)
    mse = float(total[0] / total[1])
    worker.report(loss=mse, rmse=mse**0.5, epochs_run=int(hp.get("epochs", 5)) - start)
    if rank == 0:
        out = worker.output_dir()
        # A state dict (loaded with weights_only) and the class to build: no pickled code.
        torch.save(model.module.state_dict(), out / "model.pt")
        name = (worker.spec().get("model") or {}).get("name", "linear")
        features = x.shape[1]
        worker.write_model_settings({
            "name": name, "runtime": "torch",
            "parameters": {"model_class": "torch.nn:Linear", "model_kwargs": {"in_features": features,
                                                                              "out_features": 1}},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, features]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}],
        })  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return 0
