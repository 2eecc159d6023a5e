"""The built-in TensorFlow example: linear regression under MultiWorkerMirroredStrategy,
gradients all-reduced across the TF_CONFIG workers in a custom training loop (Keras 3's
``fit`` does not run under this strategy: it fails on PerReplica inputs).

Reads the same CSV partitions as the PyTorch example (``id``, features, ``y`` last);
hyper-parameters ``lr`` (0.05), ``epochs`` (5), ``batch_size`` (16 per worker),
``dump_dir`` (each worker writes its final weights, for checks), ``seed``. Every worker takes the
same number of steps per epoch (the smallest partition's), or the all-reduce would wait.

The chief (worker 0) writes the model as ONNX (the linear layer as MatMul + Add, built with
``onnx.helper``), served by meshserve's ``onnx`` runtime: the serving process needs no
TensorFlow, and tf2onnx, which pins protobuf 3, cannot share an environment with
meshserve's gRPC stubs (protobuf 7).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from meshserve.adapters import worker
from meshserve.adapters.trainers.linear import read_rows


def _steps(files: list[str], world: int, by_row: bool, batch: int) -> int:
    """The smallest partition's batches: every worker computes the same number."""
    sizes = [len(read_rows(files[r::world] if not by_row else files, r, world, by_row)[0]) for r in range(world)]
    return max(1, min(sizes) // batch)


def export_onnx(weights, bias, path: Path) -> None:  # noqa: ANN001 - numpy arrays
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features = int(weights.shape[0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["output"])],
        "tf_linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.asarray(weights, np.float32), "W"),
         numpy_helper.from_array(np.asarray(bias, np.float32), "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def train() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    rank, world = worker.rank(), worker.world_size()
    hp = worker.hyperparameters()
    tf.random.set_seed(int(hp.get("seed", 0)))
    by_row = worker.row_shard()
    _, xs, ys = read_rows(worker.partition(), rank, world, by_row)
    if not xs:
        raise SystemExit(f"worker {rank}: no data in my partition")
    bs, lr, epochs = int(hp.get("batch_size", 16)), float(hp.get("lr", 0.05)), int(hp.get("epochs", 5))
    steps = _steps(list((worker.spec().get("data") or {}).get("files") or []), world, by_row, bs)
    x = np.asarray(xs, np.float32)
    y = np.asarray(ys, np.float32).reshape(-1, 1)
    # Each worker feeds its own partition, bs rows per step (no auto-sharding).
    data = strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensor_slices((x, y)).batch(bs, drop_remainder=True).repeat()
    )
    with strategy.scope():  # mirrored on every worker; writes are averaged (identical here)
        mean = tf.VariableAggregation.MEAN
        w = tf.Variable(tf.zeros((x.shape[1], 1)), aggregation=mean)
        b = tf.Variable(tf.zeros((1,)), aggregation=mean)

    def replica_step(xb, yb):  # noqa: ANN001 - tensors
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.matmul(xb, w) + b - yb))
        grads = tape.gradient(loss, [w, b])
        # The all-reduce: every worker gets the mean gradient and takes the same step.
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, grads)
        w.assign_sub(lr * grads[0])
        b.assign_sub(lr * grads[1])
        return loss

    @tf.function
    def step(batch) -> tf.Tensor:  # noqa: ANN001
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    batches = iter(data)
    loss = 0.0
    for epoch in range(epochs):
        for _ in range(steps):
            loss = float(step(next(batches)))
        print(f"epoch={epoch} loss={loss:.6f}", flush=True)
    weights, bias = w.numpy(), b.numpy()
    worker.report(loss=loss, rmse=loss**0.5)
    if hp.get("dump_dir"):
        Path(hp["dump_dir"]).mkdir(parents=True, exist_ok=True)
        doc = {"rank": rank, "world": world, "weights": weights.tolist(), "bias": bias.tolist()}
        (Path(hp["dump_dir"]) / f"rank-{rank}.json").write_text(json.dumps(doc))
    if rank == 0:  # the chief
        out = worker.output_dir()
        export_onnx(weights, bias, out / "model.onnx")
        name = (worker.spec().get("model") or {}).get("name", "tf-linear")
        worker.write_model_settings({
            "name": name, "runtime": "onnx", "parameters": {"providers": ["CPUExecutionProvider"]},
        })  # fmt: skip
    return 0
