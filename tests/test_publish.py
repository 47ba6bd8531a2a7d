"""`--push-to-hub`: the finished output goes up through huggingface_hub's real upload code (the
legacy LFS protocol, HF_HUB_DISABLE_XET=1) to the local fake Hub (tests/hub_server.py); every
refusal happens before the model is read, and a failed upload keeps the local output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hub_server import fake_hub, hub_env
from tiny_models import build_tiny

TOKEN = "hf_fake_write_token"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("pub") / "tiny")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_finished_folder_with_its_card(tiny, tmp_path, monkeypatch, cli):
    with fake_hub({}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        r = cli("quantize", tiny, "-b", "4", "-g", "32", "-o", tmp_path / "q", "--push-to-hub", "me/tiny-w4", "--json")
        assert r.exit_code == 0, r.output
        pub = json.loads(r.stdout)["published"]
        remote = hub.repo_files("me/tiny-w4")
    local = _files(tmp_path / "q")
    assert remote == local  # every file, byte for byte (safetensors through LFS, the rest as regular files)
    assert "model.safetensors" in remote and "README.md" in remote
    card = remote["README.md"].decode()
    assert card.startswith("---\n") and "base_model:" not in card.split("---")[1]  # a local input is no Hub model id
    assert str(tiny) in card  # ... but the card names it
    assert pub["repo"] == "me/tiny-w4" and sorted(pub["files"]) == sorted(local) and pub["commit"]


def test_push_a_single_file_output_to_a_branch_of_a_private_repo(tmp_path, monkeypatch, cli, smollm2_dir):
    from tiny_models import build_tiny_with_tokenizer_of

    src = build_tiny_with_tokenizer_of(tmp_path / "src", smollm2_dir)  # GGUF needs a tokenizer llama.cpp knows
    with fake_hub({}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        r = cli("export", src, "-f", "gguf", "-t", "F16", "-o", tmp_path / "m.gguf", "--token", TOKEN,
                "--push-to-hub", "me/tiny-gguf", "--private", "--push-branch", "f16", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["published"]["branch"] == "f16"
        assert hub.repo_files("me/tiny-gguf", "f16") == {"m.gguf": (tmp_path / "m.gguf").read_bytes()}
        assert hub.repo_files("me/tiny-gguf", "main") == {}
        assert hub.repos["me/tiny-gguf"].private


@pytest.mark.parametrize(
    "extra, code, needle",
    [
        (["--push-to-hub", "me/x"], 2, "no Hub token"),  # no token anywhere
        (["--push-to-hub", "not a repo", "--token", TOKEN], 2, "expected ORG/NAME"),
        (["--push-to-hub", "org/exists", "--token", TOKEN], 2, "add --overwrite"),
        (["--private"], 2, "without --push-to-hub"),
    ],
    ids=["no-token", "bad-id", "exists", "private-alone"],
)
def test_refusals_come_before_the_model_is_read(tiny, tmp_path, monkeypatch, extra, code, needle):
    with fake_hub({"org/exists": tiny}) as hub:
        env = hub_env(hub, tmp_path / "hf", monkeypatch)
        r = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(tmp_path / "not-read"), "-b", "4",
                            "-o", str(tmp_path / "q"), *extra], capture_output=True, text=True, env=env)
    # the model path does not even exist: a refusal that names it would mean the push checks came too late
    assert r.returncode == code, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_failed_upload_keeps_the_local_output_and_names_the_repo(tiny, tmp_path, monkeypatch):
    with fake_hub({}, fail_uploads=True) as hub:
        env = hub_env(hub, tmp_path / "hf", monkeypatch)
        env["HF_TOKEN"] = TOKEN
        r = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(tiny), "-b", "4", "-g", "32",
                            "-o", str(tmp_path / "q"), "--push-to-hub", "me/broken", "-q"],
                           capture_output=True, text=True, env=env)
        remote = hub.repo_files("me/broken") if "me/broken" in hub.repos else {}
    assert r.returncode == 5, r.stderr
    assert "me/broken" in r.stderr and "upload failed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "q" / "model.safetensors").is_file() and (tmp_path / "q" / "README.md").is_file()
    assert "model.safetensors" not in remote  # nothing committed that looks complete


def test_overwrite_pushes_into_an_existing_repo(tiny, tmp_path, monkeypatch, cli):
    with fake_hub({"org/exists": tiny}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        r = cli("quantize", tiny, "-b", "8", "-o", tmp_path / "q", "--token", TOKEN, "--push-to-hub", "org/exists",
                "--overwrite", "-q")
        assert r.exit_code == 0, r.output
        assert hub.repo_files("org/exists")["model.safetensors"] == (tmp_path / "q" / "model.safetensors").read_bytes()


def test_card_names_a_hub_base_model_in_its_metadata():
    from qtool.card import is_hub_id, model_card

    report = {"output": "out/x", "format": "gptq", "params_quantized": 1, "params_total": 2, "bpw_quantized": 4.0,
              "recipe": {"method": "rtn", "qtype": "int4", "group_size": 128, "symmetric": True}}
    assert model_card(report, "HuggingFaceTB/SmolLM2-135M-Instruct").startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert is_hub_id("org/name") and not is_hub_id("./org/name") and not is_hub_id("/abs/path") and not is_hub_id("name")
