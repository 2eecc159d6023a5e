"""Counts epochs with a per-epoch checkpoint (rank 0) and resumes from the last one."""

import json
import time

from meshserve.adapters import worker

hp = worker.hyperparameters()
epochs = int(hp.get("epochs", 6))
start = 0
checkpoint = worker.resume_from()
if checkpoint is not None:
    start = json.loads(checkpoint.read_text())["epoch"] + 1
    print(f"resumed from {checkpoint.name}", flush=True)
for epoch in range(start, epochs):
    time.sleep(float(hp.get("epoch_seconds", 0.5)))
    if worker.rank() == 0:
        worker.save_checkpoint(lambda p, e=epoch: p.write_text(json.dumps({"epoch": e})), f"epoch-{epoch}.json")
    print(f"epoch={epoch}", flush=True)
worker.report(epochs_run=epochs - start, start_epoch=start)
