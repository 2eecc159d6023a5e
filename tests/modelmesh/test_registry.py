import pytest
from meshserve.modelmesh.registry import ModelRegistry, model_key
from meshserve.protocol.errors import ModelNotFound


def test_versions_resolve_latest_ready_first():
    reg = ModelRegistry()
    for v in ("1", "2", "10", "beta"):
        reg.add("m", v, spec=v)
    reg.add("solo", None, spec="s")
    assert reg.versions("m") == ["beta", "1", "2", "10"]
    assert reg.resolve("m") == model_key("m", "10")
    assert reg.resolve("m", ready=lambda key: key != "m/10") == "m/2"
    assert reg.resolve("m", ready=lambda key: False) == "m/10"  # none ready: still the latest
    assert reg.resolve("m", "beta") == "m/beta" and reg.resolve("solo") == "solo"
    assert sorted(reg.keys("m")) == ["m/1", "m/10", "m/2", "m/beta"] and len(reg) == 5
    with pytest.raises(ModelNotFound, match="no version '3'"):
        reg.resolve("m", "3")
    with pytest.raises(ModelNotFound, match="'nope' not found"):
        reg.keys("nope")


def test_re_registering_keeps_what_was_measured():
    reg = ModelRegistry()
    first = reg.add("m", None, spec="a")
    first.disk_bytes = 123
    again = reg.add("m", None, spec="b")
    assert again is first and again.spec == "b" and again.disk_bytes == 123
