"""The bundle contract: a manifest that is not what an export writes is refused with BundleError, naming what is
wrong, whatever its shape (the server skips such a bundle with that reason; the CLIs print it on one line)."""

from __future__ import annotations

import json
import shutil

import pytest

from facetwin.core.bundle import MAX_MANIFEST_BYTES, BundleError, Manifest, load_manifest


@pytest.fixture(scope="module")
def manifest(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "tiny" / "manifest.json").read_text())


def test_an_exported_manifest_is_accepted(manifest):
    assert Manifest.from_dict(manifest).identities


@pytest.mark.parametrize(("field", "value", "message"), [
    ("input", "x", "input must be a JSON object, not str"),
    ("targets", ["target.onnx"], "targets must be a JSON object, not list"),
    ("files", "abc", "files must be a JSON object"),
    ("identities", 5, "identities must be a JSON array, not int"),
    ("model_config", [1], "model_config must be a JSON object"),
    ("targets", {"a": ["x"]}, "targets must map names to strings"),
    ("files", {"a": 5}, "files must map names to strings"),
    ("input", None, "input must be a JSON object, not NoneType"),
    ("resolution", 10**9, "must be an integer in 16..1024"),
])
def test_a_field_of_the_wrong_kind_is_refused_by_name(manifest, field, value, message):
    broken = {**manifest, field: value}
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(broken)


@pytest.mark.parametrize(("change", "message"), [
    ({"shape": None}, "malformed"),
    ({"evil": 1}, "malformed"),
    ({"value_range": "ab"}, "value_range .* must be two numbers"),
])
def test_a_tensor_spec_that_is_not_one_is_refused(manifest, change, message):
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict({**manifest, "input": {**manifest["input"], **change}})


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (" " * (MAX_MANIFEST_BYTES + 1) + "{}", "a manifest is a few KB"),
])
def test_a_manifest_file_too_deep_or_too_big_is_refused_before_it_is_parsed(tiny_model_dir, tmp_path, text, message):
    bundle = shutil.copytree(tiny_model_dir / "tiny", tmp_path / "tiny")
    (bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=message):
        load_manifest(bundle)
