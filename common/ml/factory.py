"""A user's model given as `FILE.py:FACTORY`: the file is imported and FACTORY() builds the module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

from secdfd.common.errors import ModelError


def load_factory(spec: str) -> nn.Module:
    """Build a module from 'path/to/file.py:factory'."""
    if ":" not in spec:
        raise ModelError("give the model as FILE.py:FACTORY, e.g. examples/cnn_block.py:build")
    path, name = spec.rsplit(":", 1)
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"no such file: {path}")
    modspec = importlib.util.spec_from_file_location(f"secdfd_user_{p.stem}", p)
    assert modspec is not None and modspec.loader is not None
    mod = importlib.util.module_from_spec(modspec)
    sys.modules[modspec.name] = mod
    modspec.loader.exec_module(mod)
    factory = getattr(mod, name, None)
    if not callable(factory):
        raise ModelError(f"{path} has no function {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name}() must return a torch.nn.Module")
    return model.eval()
