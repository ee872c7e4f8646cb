"""Model and adapter storage in the image: blobs, validation, views, verification."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from batos_uvm import weights as w

try:
    from tests.tinymodel import Holder, TinyImage, build_lora_adapter, build_tiny_llama
except ImportError:  # tests/ itself on sys.path
    from tinymodel import Holder, TinyImage, build_lora_adapter, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_llama(root / "base")
    return {
        "base": base,
        "other": build_tiny_llama(root / "other", hidden=32),
        "twin": build_tiny_llama(root / "twin", seed=7),  # same shapes, other weights
        "lora1": build_lora_adapter(base, root / "lora1", seed=1),
        "lora2": build_lora_adapter(base, root / "lora2", seed=2),
    }


@pytest.fixture
def image(tmp_path: Path):
    img = TinyImage(tmp_path)
    yield img
    img.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_files(image: TinyImage) -> list[Path]:
    return [p for p in image.blob_dir.rglob("*.blob")]


def test_store_survives_restart_and_loads_through_links(image: TinyImage, models) -> None:
    seen = []
    record = w.store_model(
        image.library, "alfred", models["base"], progress=lambda *a: seen.append(a)
    )
    image.tm.commit()
    assert seen and seen[-1][1] == seen[-1][2] == record.total_size
    image.restart()
    record = image.library.models["ALFRED"]
    names = {p.name for p in models["base"].iterdir()}
    assert set(record.files) == names
    for name, f in record.files.items():
        assert f.size == (models["base"] / name).stat().st_size
        assert f.sha256 == sha(models["base"] / name)
    assert record.config["architecture"] == "LlamaForCausalLM"
    assert record.parameters > record.linear_parameters > 0
    with w.materialise(record, label="persona ALFRED") as view:
        for entry in view.iterdir():  # a view of links into the blob dir, not copies
            assert entry.is_symlink()
            target = Path(os.readlink(entry))
            assert target.is_relative_to(image.blob_dir)
            assert target == Path(record.files[entry.name].blob.committed())
            assert sha(entry) == record.files[entry.name].sha256
    assert not view.exists()


def test_identical_content_and_persona_sources_share_one_record(image: TinyImage, models) -> None:
    lib = image.library
    first = w.store_model(lib, "ALFRED", models["base"])
    image.tm.commit()
    count = len(blob_files(image))
    assert w.store_model(lib, "BRICK", models["base"]) is first  # same bytes: no second copy
    assert w.store_model(lib, "robin", "ALFRED") is first  # by persona name
    image.tm.commit()
    assert len(blob_files(image)) == count
    with pytest.raises(w.WeightError, match="already has model"):
        w.store_model(lib, "BRICK", models["twin"])
    assert w.store_model(lib, "BRICK", models["twin"], replace=True) is not first


def test_truncated_safetensors_is_refused_and_nothing_is_stored(image: TinyImage, models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["base"], broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    with pytest.raises(w.WeightError, match=r"model\.safetensors: truncated"):
        w.store_model(image.library, "ALFRED", broken)
    image.tm.commit()  # even a caller that commits after the error stores nothing
    assert len(image.library.models) == 0 and not blob_files(image)
    weights.write_bytes(b"\x05")
    with pytest.raises(w.WeightError, match="no header"):
        w.store_model(image.library, "ALFRED", broken)


def test_error_while_writing_blobs_leaves_nothing_after_abort(image: TinyImage, models) -> None:
    def interrupt(name: str, done: int, total: int) -> None:
        if name == "model.safetensors":
            raise KeyboardInterrupt  # e.g. Ctrl-C half way through the weights

    with pytest.raises(KeyboardInterrupt):
        w.store_model(image.library, "ALFRED", models["base"], progress=interrupt)
    assert len(image.library.models) == 0  # the library is only touched at the very end
    image.tm.abort()
    image.restart()
    assert len(image.library.models) == 0 and not blob_files(image)


def test_non_model_directories_are_refused(image: TinyImage, models, tmp_path) -> None:
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(w.WeightError, match="not a model directory.*config.json"):
        w.store_model(image.library, "ALFRED", empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(w.WeightError, match="no weights"):
        w.store_model(image.library, "ALFRED", empty)
    with pytest.raises(w.WeightError, match="not in the local Hugging Face cache"):
        w.store_model(image.library, "ALFRED", "nobody/no-such-model")
    pickled = tmp_path / "pickled"
    shutil.copytree(models["base"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(w.WeightError, match="pytorch_model.bin: pickled"):
        w.store_model(image.library, "ALFRED", pickled)
    assert w.store_model(image.library, "ALFRED", pickled, allow_pickle=True).files


def test_missing_shard_is_named(image: TinyImage, models, tmp_path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(models["base"], sharded)
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(w.WeightError, match="model-00002-of-00002.safetensors: shard"):
        w.store_model(image.library, "ALFRED", sharded)


def test_model_id_from_the_local_hugging_face_cache(image, models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--batos--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(models["base"], snapshot)
    (cache / "models--batos--tiny" / "refs").mkdir()
    (cache / "models--batos--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    record = w.store_model(image.library, "BABS", "batos/tiny")
    assert record.model_id == "batos/tiny" and "model.safetensors" in record.files


def test_corrupted_blob_is_caught_on_first_load_after_restart(image: TinyImage, models) -> None:
    w.store_model(image.library, "ALFRED", models["base"])
    image.tm.commit()
    image.restart()
    record = image.library.models["ALFRED"]
    with w.materialise(record):
        pass  # verified once in this process
    path = Path(record.files["model.safetensors"].blob.committed())
    path.chmod(0o644)  # committed blobs are read-only
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with w.materialise(record):
        pass  # already verified in this process: not hashed again
    image.restart()
    record = image.library.models["ALFRED"]
    with pytest.raises(w.WeightIntegrityError, match="persona ALFRED.*model.safetensors"):
        with w.materialise(record, label="persona ALFRED"):
            pass
    assert len(w.verify_record(record)) == 1


def test_adapters_must_fit_the_persona_model(image: TinyImage, models, tmp_path) -> None:
    lib = image.library
    with pytest.raises(w.WeightError, match="has no model.*models add BRICK"):
        w.store_adapter(lib, "brick_style", "BRICK", models["lora1"])
    w.store_model(lib, "BRICK", models["base"])
    w.store_model(lib, "OTHER", models["other"])
    w.store_model(lib, "TWIN", models["twin"])
    record = w.store_adapter(lib, "brick_style", "brick", models["lora1"])
    assert record.persona == "BRICK" and lib.active["BRICK"] == "brick_style"
    assert record.base_fingerprint == lib.models["BRICK"].fingerprint
    with pytest.raises(w.WeightError, match="made for base model"):
        w.store_adapter(lib, "twin_style", "TWIN", models["lora1"])  # same shapes, other base
    assert w.store_adapter(lib, "twin_style", "TWIN", models["lora1"], force=True)
    with pytest.raises(w.WeightError, match="does not fit"):
        w.store_adapter(lib, "other_style", "OTHER", models["lora1"], force=True)
    with pytest.raises(w.WeightError, match="already stored"):
        w.store_adapter(lib, "brick_style", "BRICK", models["lora2"])
    image.tm.commit()
    image.restart()
    assert set(image.library.adapters) == {"brick_style", "twin_style"}


def test_incarnate_adapters_from_a_lora_folder(image: TinyImage, models, tmp_path) -> None:
    lib = image.library
    w.store_model(lib, "BRICK", models["base"])
    w.store_model(lib, "ROBIN", "BRICK")
    lora_dir = tmp_path / "lora_adapters"
    shutil.copytree(models["lora1"], lora_dir / "brick_humour")
    shutil.copytree(models["lora2"], lora_dir / "gentle")
    (lora_dir / "gentle" / "batos.json").write_text(json.dumps({"persona": "robin"}))
    shutil.copytree(models["lora2"], lora_dir / "babs_scout")
    (lora_dir / "notes").mkdir()
    shutil.copytree(models["lora1"], lora_dir / "odd")
    (lora_dir / "odd" / "batos.json").write_text(json.dumps({"persona": "../etc"}))
    results = dict(w.incarnate_adapters(lib, lora_dir))
    assert results["brick_humour"] == "stored" and results["gentle"] == "stored"
    assert results["babs_scout"].startswith("skipped: no model stored for persona BABS")
    assert results["notes"].startswith("skipped") and results["odd"].startswith("skipped")
    assert lib.adapters["gentle"].persona == "ROBIN"
    image.tm.commit()
    again = dict(w.incarnate_adapters(lib, lora_dir))
    assert again["brick_humour"] == again["gentle"] == "already stored"
    assert w.incarnate_adapters(lib, tmp_path / "missing") == []


def test_persona_names_and_missing_library() -> None:
    assert w.persona_key(" brick ") == "BRICK"
    with pytest.raises(w.WeightError):
        w.persona_key("../etc")
    with pytest.raises(w.WeightError, match="no pLLM_obj"):
        w.library_from_root({})
    with pytest.raises(w.WeightError, match="models add"):
        w.library_from_root({"pLLM_obj": Holder()})


def cli(image: TinyImage, *argv: str) -> tuple[int, str, str]:
    import argparse
    import io

    from batos_uvm.models_cli import add_models_parser, run_models_command

    parser = argparse.ArgumentParser(prog="batos.py")
    models = parser.add_subparsers(dest="command").add_parser("models")
    add_models_parser(models.add_subparsers(dest="models_command", required=True))
    out, err = io.StringIO(), io.StringIO()
    code = run_models_command(parser.parse_args(argv), image.db, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_models_command_line(image: TinyImage, models, tmp_path) -> None:
    code, out, _ = cli(image, "models", "list")
    assert code == 0 and "no models stored yet" in out
    code, out, _ = cli(image, "models", "add", "alfred", str(models["base"]))
    assert code == 0 and out.startswith("stored ALFRED: model base")
    assert cli(image, "models", "add", "BRICK", "ALFRED")[0] == 0
    code, out, _ = cli(image, "models", "add-adapter", "brick_style", "BRICK", str(models["lora1"]))
    assert code == 0 and "adapter brick_style (active)" in out
    code, _, err = cli(image, "models", "add-adapter", "x", "BRICK", str(models["other"]))
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = cli(image, "models", "add", "ROBIN", str(tmp_path / "nowhere"))
    assert code == 1 and "nowhere: no such directory" in err
    code, out, _ = cli(image, "models", "list")
    image.tm.abort()  # see what the commands committed
    record = image.library.models["ALFRED"]
    assert "ALFRED   base  LlamaForCausalLM F32" in out and "BRICK    same model as ALFRED" in out
    assert record.files["model.safetensors"].sha256[:16] in out
    assert "adapter  brick_style for BRICK (active)  r=4" in out
    code, out, _ = cli(image, "models", "verify")
    assert code == 0 and "model base (personas ALFRED, BRICK): 6 files, ok" in out
    path = Path(
        image.library.adapters["brick_style"].files["adapter_model.safetensors"].blob.committed()
    )
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    code, out, err = cli(image, "models", "verify", "brick")
    assert code == 1 and "adapter brick_style" in err and "adapter_model.safetensors" in err
    assert cli(image, "models", "verify", "BABS")[0] == 1


def test_models_commands_through_batos_py(models, tmp_path) -> None:
    import subprocess
    import sys

    main = Path(__file__).resolve().parent.parent / "batos.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BATOS_DB": str(tmp_path / "live_image.fs")}

    def batos(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(main), "models", *argv],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = batos("add", "BABS", str(models["base"]))
    assert done.returncode == 0, done.stderr
    assert "stored BABS: model base" in done.stdout
    listed = batos("list")
    assert listed.returncode == 0 and f"from {models['base']}" in listed.stdout
    failed = batos("add", "ROBIN", str(tmp_path / "nowhere"))
    assert failed.returncode == 1 and "error: " in failed.stderr
