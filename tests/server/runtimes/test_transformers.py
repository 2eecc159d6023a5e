"""The transformers runtime on tiny random BERTs with a tokenizer trained here."""

from __future__ import annotations

import numpy as np
import pytest
from meshserve.protocol.errors import InvalidInput, ModelLoadError

from tests.server.runtimes import tiny_models as tm
from tests.server.runtimes.conftest import infer, load, outputs, request

transformers = pytest.importorskip("transformers")
TEXTS = np.array([b"the cat sat on the mat", b"paris is the capital of france"], dtype=object)


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    base = tmp_path_factory.mktemp("bert")
    return {h: tm.save_tiny_bert(base / h, h) for h in ("sequence", "token", "masked-lm", "base")} | {
        "nli": tm.save_tiny_bert(base / "nli", "sequence", tm.NLI_LABELS)
    }


def test_text_classification_is_typed_and_matches_the_pipeline(berts):
    lm = load(berts["sequence"])
    assert lm.metadata.platform == "transformers:text-classification" and lm.model.supports_batching
    assert [(t.name, t.datatype) for t in lm.metadata.inputs] == [("text", "BYTES")]
    resp = infer(lm, request("clf", text=TEXTS))
    got = {t.name: t for t in resp.outputs}
    assert got["label"].datatype == "BYTES" and got["score"].datatype == "FP32" and got["score"].shape == [2]
    want = transformers.pipeline("text-classification", model=str(berts["sequence"]), device="cpu")(
        [t.decode() for t in TEXTS]
    )
    assert [x.decode() for x in got["label"].data] == [w["label"] for w in want]
    np.testing.assert_allclose(got["score"].data, [w["score"] for w in want], rtol=1e-5)
    top2 = outputs(infer(load(berts["sequence"], parameters={"top_k": 2}), request("clf", text=TEXTS)))
    assert top2["label"].shape == (2, 2) and set(top2["label"][0]) == {b"NEGATIVE", b"POSITIVE"}


def test_token_classification_pads_rows_and_counts(berts):
    lm = load(berts["token"], parameters={"aggregation_strategy": "none"})
    assert not lm.model.supports_batching
    out = outputs(infer(lm, request("ner", text=np.array([b"the cat sat", b"paris"], dtype=object))))
    assert out["count"].tolist() == [3, 1]
    assert out["entity"].shape == out["score"].shape == out["start"].shape == (2, 3)
    assert out["word"][0].tolist() == [b"the", b"cat", b"sat"] and out["word"][1, 1:].tolist() == [b"", b""]
    assert out["start"][0].tolist() == [0, 4, 8] and out["end"][1].tolist() == [5, -1, -1]
    assert out["score"].dtype == np.float32 and set(out["entity"][0]) <= {b"POSITIVE", b"NEGATIVE"}


def test_fill_mask(berts):
    lm = load(berts["masked-lm"], name="mlm", parameters={"top_k": 3})
    out = outputs(infer(lm, request("mlm", text=np.array([b"the cat [MASK] on the mat"], dtype=object))))
    assert out["token_str"].shape == out["score"].shape == out["token"].shape == (1, 3)
    assert (np.diff(out["score"][0]) <= 0).all() and out["sequence"][0, 0].startswith(b"the cat")
    with pytest.raises(InvalidInput, match=r"model 'mlm': each text needs exactly one \[MASK\]"):
        infer(lm, request("mlm", text=TEXTS))


def test_zero_shot_with_labels_as_a_tensor(berts):
    lm = load(berts["nli"], parameters={"task": "zero-shot-classification"})
    assert [t.name for t in lm.metadata.inputs] == ["text", "candidate_labels"]
    labels = np.array([b"animal", b"city", b"food"], dtype=object)
    out = outputs(infer(lm, request("zs", text=TEXTS, candidate_labels=labels)))
    assert out["labels"].shape == out["scores"].shape == (2, 3)
    assert set(out["labels"][0]) == set(labels)
    np.testing.assert_allclose(out["scores"].sum(axis=1), 1, rtol=1e-5)


def test_embeddings_pool_over_real_tokens_only(berts):
    import torch

    lm = load(berts["base"], parameters={"task": "embeddings", "normalize": True})
    emb = outputs(infer(lm, request("emb", text=TEXTS)))["embedding"]
    assert emb.shape == (2, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(berts["base"]))
    model = transformers.AutoModel.from_pretrained(str(berts["base"])).eval()
    with torch.inference_mode():  # alone, no padding: the pooled row must be the same
        hidden = model(**tok(TEXTS[1].decode(), return_tensors="pt")).last_hidden_state[0]
    alone = hidden.mean(dim=0).numpy()
    np.testing.assert_allclose(emb[1], alone / np.linalg.norm(alone), rtol=1e-4, atol=1e-5)


def test_bad_requests_and_folders(berts, tmp_path):
    lm = load(berts["sequence"])
    with pytest.raises(InvalidInput, match="input 'text' must be BYTES"):
        infer(lm, request("clf", text=np.ones(2, np.float32)))
    with pytest.raises(InvalidInput, match="not UTF-8"):
        infer(lm, request("clf", text=np.array([b"\xff\xfe"], dtype=object)))
    with pytest.raises(ModelLoadError, match="unsupported task 'summarization'"):
        load(berts["sequence"], parameters={"task": "summarization"})
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load(tmp_path, runtime="transformers")
