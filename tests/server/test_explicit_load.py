"""Triton's explicit model control over REST: a folder copied into --model-dir after start
is listed by the index as UNAVAILABLE, registered and loaded by ``load``, and round-trips
through ``unload``/``load``; the load policy and model names still gate it.

These tests add folders to the model directory, so they use a server of their own."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import EXAMPLES, RunningServer, start_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    models = tmp_path_factory.mktemp("explicit") / "models"
    shutil.copytree(EXAMPLES / "echo", models / "echo")
    srv = start_server(models, tmp_path_factory.mktemp("log") / "server.log")
    yield srv, models
    srv.stop()


@pytest.fixture(scope="module")
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0].http_url, timeout=30) as c:
        yield c


def _index(http: httpx.Client) -> dict[str, dict]:
    r = http.post("/v2/repository/index", json={})
    assert r.status_code == 200, r.text
    return {row["name"]: row for row in r.json()}


def _echo(http: httpx.Client, model: str) -> httpx.Response:
    doc = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, -2.0]}]}
    return http.post(f"/v2/models/{model}/infer", json=doc)


def _add_echo(models: Path, name: str, settings: dict | None = None) -> Path:
    folder = models / name
    shutil.copytree(EXAMPLES / "echo", folder)
    doc = {"name": name, "runtime": "python", "implementation": "model.py:EchoModel", **(settings or {})}
    (folder / "model-settings.json").write_text(json.dumps(doc))
    return folder


def test_new_folder_is_listed_then_loaded(served, http):
    _, models = served
    _add_echo(models, "late_echo")
    row = _index(http)["late_echo"]
    assert row["state"] == "UNAVAILABLE"
    assert "/v2/repository/models/late_echo/load" in row["reason"]
    assert _echo(http, "late_echo").status_code == 404  # not registered until asked
    r = http.post("/v2/repository/models/late_echo/load")
    assert r.status_code == 200, r.text
    assert _index(http)["late_echo"]["state"] == "READY"
    r = _echo(http, "late_echo")
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1.5, -2.0]
    assert http.get("/v2/models/late_echo/ready").status_code == 200


def test_unload_then_load_round_trips(served, http):
    _, models = served
    _add_echo(models, "round_trip")
    assert http.post("/v2/repository/models/round_trip/load").status_code == 200
    assert http.post("/v2/repository/models/round_trip/unload").status_code == 200
    assert _index(http)["round_trip"]["state"] == "UNLOADED"
    assert _echo(http, "round_trip").status_code == 503
    assert http.post("/v2/repository/models/round_trip/load").status_code == 200
    assert _echo(http, "round_trip").status_code == 200


def test_folder_without_a_model_is_listed_with_its_reason(served, http):
    _, models = served
    (models / "empty_folder").mkdir()
    (models / "empty_folder" / "notes.txt").write_text("nothing to serve")
    row = _index(http)["empty_folder"]
    assert row["state"] == "UNAVAILABLE"
    assert "no model file" in row["reason"]
    r = http.post("/v2/repository/models/empty_folder/load")
    assert r.status_code == 400
    assert "no model file" in r.json()["error"]
    assert _index(http)["empty_folder"]["state"] == "UNAVAILABLE"  # still not registered


def test_ready_only_index_leaves_folders_out(served, http):
    _, models = served
    _add_echo(models, "not_ready_yet")
    rows = http.post("/v2/repository/index", json={"ready": True}).json()
    assert "not_ready_yet" not in {r["name"] for r in rows}
    assert "echo" in {r["name"] for r in rows}


def test_missing_folder_is_404_naming_the_model_dir(served, http):
    _, models = served
    r = http.post("/v2/repository/models/never_there/load")
    assert r.status_code == 404
    assert "never_there" in r.json()["error"] and str(models) in r.json()["error"]


@pytest.mark.parametrize("name", ["..", ".hidden", "a\\b", "%2e%2e"])
def test_unsafe_names_load_nothing(http, name):
    r = http.post(f"/v2/repository/models/{name}/load")
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()


def test_symlink_out_of_the_model_dir_is_refused(served, http, tmp_path):
    _, models = served
    outside = _add_echo(tmp_path, "outside")
    (models / "linked_out").symlink_to(outside, target_is_directory=True)
    r = http.post("/v2/repository/models/linked_out/load")
    assert r.status_code == 403, r.text
    assert "outside the model directory" in r.json()["error"]
    assert _echo(http, "linked_out").status_code == 404


def test_code_by_import_path_meets_the_load_policy(served, http):
    """A settings file that arrived after start names code like a client's config would:
    an importable module is refused (403) unless the server runs with --repository-code."""
    _, models = served
    _add_echo(models, "imports_code", {"implementation": "json:JSONDecoder"})
    r = http.post("/v2/repository/models/imports_code/load")
    assert r.status_code == 403, r.text
    assert "--repository-code" in r.json()["error"]
    assert _echo(http, "imports_code").status_code == 404


def test_settings_naming_another_model_is_refused(served, http):
    _, models = served
    folder = _add_echo(models, "wrong_name")
    (folder / "model-settings.json").write_text(json.dumps({"name": "other", "implementation": "model.py:EchoModel"}))
    r = http.post("/v2/repository/models/wrong_name/load")
    assert r.status_code == 400
    assert "other" in r.json()["error"]


def test_broken_settings_file_is_400(served, http):
    _, models = served
    folder = _add_echo(models, "broken_json")
    (folder / "model-settings.json").write_text("{not json")
    r = http.post("/v2/repository/models/broken_json/load")
    assert r.status_code == 400, r.text
    assert "broken_json" in r.json()["error"]


def test_repository_uris_none_registers_no_new_folder(tmp_path):
    """--repository-uris none: only models registered at start can be (re)loaded over the API."""
    models = tmp_path / "models"
    shutil.copytree(EXAMPLES / "echo", models / "echo")
    srv = start_server(models, tmp_path / "server.log", "--repository-uris", "none")
    try:
        _add_echo(models, "late")
        with httpx.Client(base_url=srv.http_url, timeout=30) as http:
            r = http.post("/v2/repository/models/late/load")
            assert r.status_code == 403, r.text
            assert "--repository-uris none" in r.json()["error"]
            assert _echo(http, "late").status_code == 404
            assert http.post("/v2/repository/models/echo/load").status_code == 200  # registered: reloads
    finally:
        srv.stop()
