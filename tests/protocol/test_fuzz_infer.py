"""Fuzzers for the infer codecs against one real server over real sockets (issue #13).

Hypothesis writes REST bodies with the binary tensor extension and gRPC ModelInfer /
ModelStreamInfer messages, well-formed and not. Whatever arrives, the server answers within a
deadline with a 4xx (REST) or a client-side status (gRPC), never a 5xx / INTERNAL / UNKNOWN,
keeps serving a known-good request and keeps its memory. Each fuzzer is sized to run ~10 s.
"""

from __future__ import annotations

import json
import struct
from collections import Counter

import grpc
import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshserve.protocol.datatypes import DTYPES
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc.codec import CONTENTS_FIELD

from tests.protocol.process_memory import vm_rss

MiB = 1024 * 1024
DEADLINE_S = 10.0
RSS_BOUND = 64 * MiB  # a run's requests are a few KiB each: anything near this is a leak
FUZZ = settings(  # examples per fuzzer: set where each is used, for ~10 s on a busy two-core machine
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
T = pb.ModelInferRequest.InferInputTensor
SERVER_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}

# --- pieces both fuzzers draw from ---------------------------------------------------------

datatypes = st.one_of(st.sampled_from(list(DTYPES)), st.sampled_from(["fp32", "", "BF16", "FP8", "UINT128"]))
odd_dims = st.sampled_from([-1, -2, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1])
dims = st.one_of(st.integers(0, 4), odd_dims)
shapes = st.one_of(
    st.lists(st.integers(0, 4), max_size=4),
    st.lists(dims, max_size=6),
    st.lists(dims, min_size=1, max_size=3).map(lambda s: [*s, 0]),  # huge but empty
    st.lists(st.just(1), min_size=30, max_size=70),
)
rest_shapes = st.one_of(
    shapes,
    st.lists(st.sampled_from([2**64 - 1, 2**64, 1.0, True, "2", None]), min_size=1, max_size=3),
    st.sampled_from(["[1]", {}, None, 3]),
)
items = st.binary(max_size=6)


def bytes_blob(draw, count: int, good: bool) -> tuple[bytes, list[bytes]]:
    """``count`` length-prefixed BYTES elements, sometimes with a lying or truncated prefix."""
    elements = draw(st.lists(items, min_size=count, max_size=count))
    blob = b"".join(struct.pack("<I", len(b)) + b for b in elements)
    damage = "none" if good else draw(st.sampled_from(["none", "none", "huge", "cut", "extra"]))
    if damage == "huge":
        blob += struct.pack("<I", 0xFFFFFFFF) + b"x"
    elif damage == "cut" and blob:
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif damage == "extra":
        blob += b"\x00\x00"
    return blob, elements


@st.composite
def tensor(draw, good: bool = False):
    """(datatype, shape, raw bytes, flat values): consistent if ``good`` or by chance, odd the rest."""
    if good or draw(st.booleans()):
        datatype = draw(st.sampled_from(list(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        count = int(np.prod(shape)) if shape else 1
        if draw(st.integers(0, 4)) == 0:
            shape = [-1, *shape[1:]] if shape else [-1]
    else:
        datatype, shape = draw(datatypes), draw(shapes)
        count = draw(st.sampled_from([0, 0, 1, 2, 3, 6]))
    if datatype == "BYTES":
        return datatype, shape, *bytes_blob(draw, count, good)
    dtype = DTYPES.get(datatype, np.dtype("<f4"))
    size = count * dtype.itemsize
    blob = draw(st.binary(min_size=size, max_size=size))
    if datatype == "BOOL" and (good or draw(st.booleans())):
        blob = bytes(b & 1 for b in blob)  # valid booleans, or now and then 0x02-0xff
    if not good and draw(st.integers(0, 5)) == 0:
        blob += draw(st.binary(min_size=1, max_size=3))  # not a whole number of elements
    values = np.frombuffer(blob[: len(blob) - len(blob) % dtype.itemsize], dtype=dtype)
    if dtype.kind == "f":  # JSON has no NaN: big values instead, past FP16/FP32 range
        with np.errstate(invalid="ignore"):
            values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
    return datatype, shape, blob, values.tolist()


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
json_data = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
parameter_values = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**64), st.floats(allow_nan=False), st.text(max_size=8)
)


# --- REST: JSON + binary tensor extension -----------------------------------------------------


@st.composite
def rest_request(draw) -> tuple[bytes, dict[str, str]]:
    """A body and its headers; a third of them well-formed throughout."""
    good = draw(st.integers(0, 2)) == 0
    specs, blobs = [], []
    for i in range(draw(st.integers(1, 3))):
        datatype, shape, blob, values = draw(tensor(good))
        name = f"in{i}" if good else draw(st.sampled_from([f"in{i}", "in0", ""]))
        spec: dict = {"name": name, "datatype": datatype, "shape": shape}
        if not good and draw(st.booleans()):
            spec["shape"] = draw(rest_shapes)
        forms = ["binary", "json"] if good else ["binary", "binary", "json", "odd json", "both", "neither"]
        form = draw(st.sampled_from(forms))
        if form in ("binary", "both"):
            sizes = [len(blob)] if good else [len(blob)] * 4 + [len(blob) + 1, -1, 2**64, "8", 1.5, None]
            size = draw(st.sampled_from(sizes))
            spec["parameters"] = {"binary_data_size": size}
            blobs.append(blob)
        if form in ("json", "both"):
            spec["data"] = [b.decode("latin-1") for b in values] if datatype == "BYTES" else values
        elif form == "odd json":
            spec["data"] = draw(json_data)
        if not good and draw(st.integers(0, 5)) == 0:
            spec.setdefault("parameters", {})["extra"] = draw(parameter_values)
        specs.append(spec)
    doc: dict = {"inputs": specs}
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.integers(0, 3)) == 0:
        doc["outputs"] = [{"name": s["name"], "parameters": {"binary_data": draw(st.booleans())}} for s in specs]
    header = json.dumps(doc).encode()  # not orjson: it refuses integers past 64 bits, which are the point
    body = header + b"".join(blobs)
    headers = {"content-type": "application/octet-stream"}
    lengths = ["exact"] if good else ["exact"] * 6 + ["none", "short", "long", "negative", "junk", "whole"]
    length = draw(st.sampled_from(lengths))
    value = {"exact": len(header), "short": len(header) - 1, "long": len(header) + 3, "negative": -4,
             "junk": "x1", "whole": len(body) + 1}.get(length)  # fmt: skip
    if value is not None:
        headers["inference-header-content-length"] = str(value)
    if not good and draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # cut anywhere
    return body, headers


def _rest_known_good(http: httpx.Client) -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}
    r = http.post("/v2/models/echo/infer", json=doc)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


def test_fuzz_rest_binary_extension(echo_server, http):
    statuses: Counter[int] = Counter()

    @settings(FUZZ, max_examples=2500)
    @given(rest_request())
    def check(case):
        body, headers = case
        r = http.post("/v2/models/echo/infer", content=body, headers=headers, timeout=DEADLINE_S)
        statuses[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, r.text, body[:300], headers)
        if r.status_code >= 400:
            assert isinstance(r.json()["error"], str)

    _rest_known_good(http)
    before = vm_rss(echo_server.proc.pid)
    check()
    growth = vm_rss(echo_server.proc.pid) - before
    _rest_known_good(http)
    print(f"\nREST fuzz: {sum(statuses.values())} requests, statuses {dict(statuses)}, RSS {growth / MiB:+.1f} MiB")
    assert sum(statuses.values()) >= 2000 and statuses[200] > 0 and statuses[400] > 0
    assert growth < RSS_BOUND


# --- gRPC: ModelInfer and ModelStreamInfer -------------------------------------------------------

contents_values = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": items,
}


@st.composite
def grpc_parameters(draw, target) -> None:
    for key in draw(st.lists(st.sampled_from(["a", "binary_data_size", "sequence_id", ""]), max_size=2)):
        kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
        value = {"bool_param": st.booleans(), "int64_param": st.integers(-(2**63), 2**63 - 1),
                 "string_param": st.text(max_size=6), "double_param": st.floats(),
                 "uint64_param": st.integers(0, 2**64 - 1)}[kind]  # fmt: skip
        setattr(target[key], kind, draw(value))


@st.composite
def grpc_request(draw) -> pb.ModelInferRequest:
    """A message; a third of them well-formed throughout."""
    good = draw(st.integers(0, 2)) == 0
    model = "echo" if good else draw(st.sampled_from(["echo"] * 9 + ["nope"]))
    msg = pb.ModelInferRequest(model_name=model, id=draw(st.text(max_size=4)))
    raw = draw(st.booleans())
    for i in range(draw(st.integers(1 if good else 0, 3))):
        datatype, shape, blob, values = draw(tensor(good))
        if good and not raw and datatype == "FP16":
            datatype = "FP32"  # FP16 has no typed field
        name = f"in{i}" if good else draw(st.sampled_from([f"in{i}", "in0", ""]))
        inp = msg.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            msg.raw_input_contents.append(blob)
        elif datatype in CONTENTS_FIELD and (good or draw(st.booleans())):
            field = CONTENTS_FIELD[datatype]  # the right field with the tensor's own values, where they fit
            try:
                getattr(inp.contents, field).extend(values)
            except (TypeError, ValueError):
                getattr(inp.contents, field).extend(draw(st.lists(contents_values[field], max_size=6)))
        else:
            field = draw(st.sampled_from(sorted(contents_values)))
            getattr(inp.contents, field).extend(draw(st.lists(contents_values[field], max_size=6)))
        if not good:
            draw(grpc_parameters(inp.parameters))
    if raw and not good and draw(st.integers(0, 4)) == 0:
        msg.raw_input_contents.append(b"\x00" * 4)  # one entry too many
    draw(grpc_parameters(msg.parameters))
    if draw(st.booleans()):
        msg.outputs.add(name=draw(st.sampled_from(["in0", "x"])))
    return msg


def _grpc_known_good(stub) -> None:
    arr = np.arange(4, dtype=np.float32)
    msg = pb.ModelInferRequest(model_name="echo", inputs=[T(name="x", datatype="FP32", shape=[1, 4])],
                               raw_input_contents=[arr.tobytes()])  # fmt: skip
    assert stub.ModelInfer(msg, timeout=DEADLINE_S).raw_output_contents[0] == arr.tobytes()


def test_fuzz_grpc_infer_and_stream(echo_server, stub):
    codes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=1200)
    @given(st.lists(grpc_request(), min_size=1, max_size=3), st.booleans())
    def check(msgs, streamed):
        if not streamed:
            for msg in msgs:
                try:
                    stub.ModelInfer(msg, timeout=DEADLINE_S)
                    codes["OK"] += 1
                except grpc.RpcError as e:
                    codes[e.code().name] += 1
                    assert e.code() not in SERVER_CODES, (e.code(), e.details(), msg)
            return
        answers = list(stub.ModelStreamInfer(iter(msgs), timeout=DEADLINE_S))
        assert len(answers) == len(msgs)
        for answer in answers:
            codes["stream error" if answer.error_message else "stream OK"] += 1
            assert "internal" not in answer.error_message, answer.error_message

    _grpc_known_good(stub)
    before = vm_rss(echo_server.proc.pid)
    check()
    growth = vm_rss(echo_server.proc.pid) - before
    _grpc_known_good(stub)
    print(f"\ngRPC fuzz: {sum(codes.values())} requests, codes {dict(codes)}, RSS {growth / MiB:+.1f} MiB")
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0 and codes["stream OK"] > 0
    assert growth < RSS_BOUND
