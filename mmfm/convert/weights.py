"""Safetensors files checked before they are loaded: one line naming the file and the field.

safetensors validates a header itself (length, UTF-8, JSON, offsets covering the file) but
raises its own `SafetensorError` with a traceback; a state dict of the wrong shapes reaches
`load_state_dict` as a multi-line RuntimeError. These helpers read only the header (no tensor
data), so a damaged file or a `train.init_from` of another model size is refused before any
weight is copied:

    check_fits(Path(cfg.train.init_from) / "model.safetensors", model, "train.init_from")
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mmfm.errors import UserValueError


class WeightsError(UserValueError):
    """A weights file that is damaged or does not fit the model it should initialize."""


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header; WeightsError when it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"{path}: not a valid safetensors file ({reason})") from None


def shape_differences(file_shapes: dict[str, tuple[int, ...]],
                      model_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every tensor missing, unexpected or of another shape, as short phrases."""
    diffs = [f"{name} has shape {list(file_shapes[name])} in the file, {list(shape)} in the model"
             for name, shape in model_shapes.items()
             if name in file_shapes and tuple(file_shapes[name]) != tuple(shape)]
    missing = sorted(set(model_shapes) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(model_shapes))
    if missing:
        diffs.append(f"missing {_few(missing)}")
    if unexpected:
        diffs.append(f"unexpected {_few(unexpected)}")
    return diffs


def check_fits(path: Path, model: torch.nn.Module, field: str = "weights") -> None:
    """Refuse, in one line naming `field` and `path`, weights that do not fit `model`.
    A tied tensor (`lm_head.weight` sharing the embedding) may be stored once, as
    safetensors' `save_model` does."""
    file_shapes = read_shapes(path)
    state = model.state_dict()
    stored = {state[k].data_ptr() for k in state if k in file_shapes}
    model_shapes = {k: tuple(v.shape) for k, v in state.items()
                    if k in file_shapes or v.data_ptr() not in stored}
    diffs = shape_differences(file_shapes, model_shapes)
    if diffs:
        raise WeightsError(f"{field}={path} does not fit this model: {'; '.join(diffs)}")


def _few(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
