"""EAGLE head checkpoints in a local directory, in whichever layout wrote them.

Two layouts, told apart by their config file (:func:`checkpoint_layout`):

* ``"microspec"``: this project's own (``microspec train-eagle``), ``eagle_config.json`` and
  ``eagle_head.safetensors`` with the head's own tensors (``fc.*``, ``layer.*``);
* ``"eagle"``: SafeAILab's EAGLE-1/2 releases, a Llama-style ``config.json`` (``bias``: whether
  ``fc`` has one) and ``model.safetensors`` or ``pytorch_model.bin`` whose keys are ``fc.*``,
  ``layers.0.*`` (the first layer has no ``input_layernorm``; one saved is ignored) and,
  in some releases, the target's ``embed_tokens.weight`` (the head shares the target's).

EAGLE-3's layout (``midlayer.*``, ``d2t`` / ``t2d``, its own ``lm_head``) is one more case of
:func:`checkpoint_layout` and one more key map beside :func:`eagle_state`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["OWN_CONFIG", "OWN_WEIGHTS", "checkpoint_layout", "missing_files", "eagle_config",
           "eagle_state"]

OWN_CONFIG = "eagle_config.json"
OWN_WEIGHTS = "eagle_head.safetensors"
EAGLE_CONFIG = "config.json"
EAGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def checkpoint_layout(directory: str | Path) -> str:
    """``"microspec"`` or ``"eagle"`` (module docstring).

    Raises
    ------
    FileNotFoundError : neither layout's config is in ``directory``
    """
    directory = Path(directory)
    if (directory / OWN_CONFIG).is_file():
        return "microspec"
    if (directory / EAGLE_CONFIG).is_file():
        return "eagle"
    raise FileNotFoundError(
        f"no EAGLE head at {directory}: neither {OWN_CONFIG} (microspec train-eagle) nor "
        f"{EAGLE_CONFIG} (an EAGLE-1/2 release) is there")


def missing_files(directory: str | Path) -> list[str]:
    """What a head directory lacks for its layout (empty: complete), checked without reading it."""
    directory = Path(directory)
    if (directory / OWN_CONFIG).is_file():
        return [] if (directory / OWN_WEIGHTS).is_file() else [OWN_WEIGHTS]
    if (directory / EAGLE_CONFIG).is_file():
        return [] if any((directory / n).is_file() for n in EAGLE_WEIGHTS) else [
            " or ".join(EAGLE_WEIGHTS)]
    return [f"{OWN_CONFIG} or {EAGLE_CONFIG}"]


def eagle_config(directory: str | Path) -> dict:
    """The ``config.json`` of an EAGLE-1/2 release."""
    return json.loads((Path(directory) / EAGLE_CONFIG).read_text())


def eagle_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """An EAGLE-1/2 release's tensors under :class:`EagleHead`'s names (``fc.*``, ``layer.*``).

    Raises
    ------
    FileNotFoundError : no weights file
    ValueError : a key of another layout (an EAGLE-3 checkpoint, a whole model)
    """
    directory = Path(directory)
    path = next((directory / n for n in EAGLE_WEIGHTS if (directory / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no EAGLE head weights at {directory}: none of "
                                f"{', '.join(EAGLE_WEIGHTS)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        if key == "embed_tokens.weight" or key == "layers.0.input_layernorm.weight":
            continue  # the target's embedding is shared; EAGLE's first layer has no input norm
        if key.startswith("fc."):
            renamed[key] = value
        elif key.startswith("layers.0."):
            renamed["layer." + key[len("layers.0."):]] = value
        else:
            raise ValueError(f"{path} holds {key!r}, which an EAGLE-1/2 head does not have "
                             "(an EAGLE-3 checkpoint or a whole model?)")
    return renamed
