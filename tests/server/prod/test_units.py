"""The pure parts: settings from the environment, tokens, names, ownership, metric merging."""

from __future__ import annotations

import pytest
from meshserve.protocol.errors import InvalidInput
from meshserve.server.security import Auth, check_model_name
from meshserve.server.settings import Settings
from meshserve.server.workers import merge_metrics, owner_of

from tests.server.prod.conftest import scrape


def test_settings_from_env_keep_the_token_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("MESHSERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("MESHSERVE_AUTH_TOKEN", "hunter2")
    monkeypatch.setenv("MESHSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("MESHSERVE_WORKERS", "3")
    s = Settings.load()
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.auth_token.get_secret_value() == "hunter2" and "hunter2" not in repr(s)
    assert s.log_format == "json" and s.workers == 3
    monkeypatch.setenv("MESHSERVE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        Settings.load()


def test_auth_check():
    auth = Auth([b"tok-1", b"tok-2"], health=False, metrics=True)
    assert auth.check(b"Bearer tok-1", None) and auth.check(b"bearer  tok-2 ", None)
    assert auth.check(None, b"tok-2")
    for authorization, key in [(None, None), (b"Bearer", None), (b"Basic tok-1", None), (b"Bearer tok", None),
                               (None, b""), (None, b"tok-1x"), (b"tok-1", None)]:  # fmt: skip
        assert not auth.check(authorization, key), (authorization, key)
    assert not auth.protects("/v2/health/ready") and auth.protects("/metrics") and auth.protects("/v2")


@pytest.mark.parametrize("name", ["..", ".", "../etc", "a/b", "a\\b", ".hidden", "", "x\x00", "x\ny", "a" * 300])
def test_bad_model_names(name):
    with pytest.raises(InvalidInput):
        check_model_name(name)


@pytest.mark.parametrize("name", ["iris", "my-model_v2.onnx", "UPPER", "a..b"])
def test_good_model_names(name):
    check_model_name(name)


def test_ownership_is_stable_balanced_and_moves_little():
    names = [f"model-{i}" for i in range(3000)]
    two = [owner_of(n, 2) for n in names]
    assert two == [owner_of(n, 2) for n in names]
    assert 0.45 < two.count(0) / len(names) < 0.55
    three = [owner_of(n, 3) for n in names]
    moved = [(a, b) for a, b in zip(two, three, strict=True) if a != b]
    assert all(b == 2 for _, b in moved)  # only to the new worker
    assert 0.28 < len(moved) / len(names) < 0.39


def test_merge_metrics_sums_by_name_and_labels():
    a = b"""# HELP x Things.
# TYPE x counter
x_total{model="m"} 2.0
x_created{model="m"} 1.7e9
# HELP lat Latency.
# TYPE lat histogram
lat_bucket{le="0.1"} 1.0
lat_bucket{le="+Inf"} 2.0
lat_count 2.0
lat_sum 0.5
# HELP g Gauge.
# TYPE g gauge
g 3.0
"""
    b = a.replace(b'x_total{model="m"} 2.0', b'x_total{model="m"} 5.0\nx_total{model="n"} 1.0')
    text = merge_metrics([a, b]).decode()
    assert scrape(text, "x_total", model="m") == 7 and scrape(text, "x_total", model="n") == 1
    assert scrape(text, "lat_count") == 4 and scrape(text, "lat_bucket", le="0.1") == 2 and scrape(text, "g") == 6
    assert "x_created" not in text
