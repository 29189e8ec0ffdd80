"""Flatten a user's nested state into keyed tensors and JSON leaves, and restore it.

The state is a nested dict of tensors, DTensors, ``nn.Module`` and optimizer objects,
anything following DCP's ``Stateful`` convention (``state_dict`` / ``load_state_dict``),
:class:`ckptd.rng.RNGState` markers, and small JSON-able values. Flattening keeps
references to the live tensors (no copies) so that load fills them in place.

Optimizers are keyed by parameter FQN (via ``torch.distributed.checkpoint.state_dict``)
when the module that owns their parameters is in the same state, so their state
follows the parameters through any layout change.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ckptd.errors import CkptError
from ckptd.keys import validate_state_key
from ckptd.rng import RNGState

JSON_TYPES = (str, int, float, bool, type(None))


class UnsupportedStateError(CkptError, TypeError):
    """A value in the state can be neither stored as a tensor nor as JSON."""


@dataclass
class FlatState:
    """Flattened view of a state: live tensors, JSON leaves, and how to put them back."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    param_of: dict[str, str] = field(default_factory=dict)
    rng_keys: list[str] = field(default_factory=list)
    # Called after load with the (filled) flattened values, to write back JSON leaves
    # and to call load_state_dict on Stateful objects, in flattening order.
    _setters: dict[str, Callable[[Any], None]] = field(default_factory=dict)
    _finalizers: list[Callable[[], None]] = field(default_factory=list)
    _rng_objects: dict[str, RNGState] = field(default_factory=dict)

    def set_object(self, key: str, value: Any) -> None:
        """Write a loaded JSON leaf back into the user's state."""
        self._setters[key](value)
        self.objects[key] = value

    def rng_object(self, key: str) -> RNGState:
        return self._rng_objects[key]

    def finalize(self) -> None:
        """Call ``load_state_dict`` on Stateful objects after their values were filled."""
        for fn in self._finalizers:
            fn()


def flatten_state(state: dict[str, Any]) -> FlatState:
    """Flatten ``state`` (see module docstring). Raises :class:`UnsupportedStateError`."""
    if not isinstance(state, dict):
        raise UnsupportedStateError(f"state must be a dict, got {type(state).__name__}")
    flat = FlatState()
    modules = {k: v for k, v in state.items() if isinstance(v, torch.nn.Module)}
    _walk(state, "", flat, modules)
    return flat


def _walk(obj: Any, prefix: str, flat: FlatState, modules: dict[str, torch.nn.Module]) -> None:
    items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
    for k, v in items:
        key = validate_state_key(f"{prefix}{k}")
        _leaf(obj, k, v, key, flat, modules)


def _leaf(
    container: Any, k: Any, v: Any, key: str, flat: FlatState, modules: dict[str, torch.nn.Module]
) -> None:
    if isinstance(v, torch.Tensor):
        flat.tensors[key] = v
    elif isinstance(v, RNGState):
        flat.rng_keys.append(key)
        flat._rng_objects[key] = v
    elif isinstance(v, torch.nn.Module):
        sd = v.state_dict()
        _walk(sd, key + ".", flat, modules)
    elif isinstance(v, torch.optim.Optimizer):
        _optimizer(v, key, flat, modules)
    elif hasattr(v, "state_dict") and hasattr(v, "load_state_dict"):
        sd = v.state_dict()
        if not isinstance(sd, dict):
            raise UnsupportedStateError(f"{key!r}: state_dict() returned {type(sd).__name__}")
        _walk(sd, key + ".", flat, modules)
        flat._finalizers.append(functools.partial(v.load_state_dict, sd))
    elif isinstance(v, dict):
        # Recurse even into JSON-only dicts: leaves are then written back into the
        # user's own dict on load, so references the trainer holds stay live.
        _walk(v, key + ".", flat, modules)
    elif isinstance(v, (list, tuple)):
        if _is_json(v):
            _json_leaf(container, k, v, key, flat)
        elif isinstance(v, list):
            _walk(v, key + ".", flat, modules)
        else:
            raise UnsupportedStateError(f"{key!r}: tuples may hold only JSON values")
    elif isinstance(v, JSON_TYPES):
        _json_leaf(container, k, v, key, flat)
    else:
        raise UnsupportedStateError(
            f"{key!r}: cannot checkpoint a {type(v).__name__}; use tensors, JSON values, "
            "or an object with state_dict()/load_state_dict()"
        )


def _json_leaf(container: Any, k: Any, v: Any, key: str, flat: FlatState) -> None:
    flat.objects[key] = v

    def setter(value: Any, container: Any = container, k: Any = k) -> None:
        container[k] = value

    flat._setters[key] = setter


def _is_json(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, JSON_TYPES):
        return True
    if isinstance(v, dict):
        return all(isinstance(k, str) for k in v) and all(_is_json(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(_is_json(x) for x in v)
    return False


def _optimizer(
    optim: torch.optim.Optimizer, key: str, flat: FlatState, modules: dict[str, torch.nn.Module]
) -> None:
    owner = _owning_module(optim, modules)
    if owner is None:
        # No module to name the parameters: keyed by position (layout-dependent).
        sd = optim.state_dict()
        _walk(sd, key + ".", flat, modules)
        flat._finalizers.append(lambda: optim.load_state_dict(sd))
        return
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    mkey, model = owner
    # (initializes lazily-created state; a plain dict at run time)
    osd = cast(dict[str, Any], get_optimizer_state_dict(model, optim))
    # Param-group "params" lists name this rank's parameters (stage-local under PP):
    # they describe the layout, not the state. Keep the loading optimizer's own lists
    # and store only the hyperparameters, so a layout change needs no merge rule.
    groups = osd.get("param_groups", [])
    own_params = [g.pop("params", []) for g in groups]
    for fqn, per_param in osd.get("state", {}).items():
        for sname, t in per_param.items():
            if isinstance(t, torch.Tensor):
                flat.param_of[validate_state_key(f"{key}.state.{fqn}.{sname}")] = f"{mkey}.{fqn}"
    _walk(osd, key + ".", flat, modules)

    def restore() -> None:
        for g, params in zip(osd.get("param_groups", []), own_params):
            g["params"] = params
        set_optimizer_state_dict(model, optim, osd)

    flat._finalizers.append(restore)


def _owning_module(
    optim: torch.optim.Optimizer, modules: dict[str, torch.nn.Module]
) -> tuple[str, torch.nn.Module] | None:
    params = {id(p) for g in optim.param_groups for p in g["params"]}
    for mkey, m in modules.items():
        if params <= {id(p) for p in m.parameters()}:
            return mkey, m
    return None


def json_dumps(v: Any) -> str:
    """Canonical JSON for comparing values across ranks."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"))
