"""Model families, one module each, registered by the transformers `model_type`s they read.

A family module (any module of this package but `base`) defines `FAMILY`, a `base.Family`: the
ModelSpec fields it reads off a config, the traits the shared code selects behaviour by (norm,
activation, MLP form, positions, where the attention scale applies) and, per layer, its tensors with
their shapes and checkpoint names. The kernels, lowering, planner and weight store read those traits,
spec fields and tables, never a family's name; adding a family is one module here plus its tests.

    >>> for_model_type("qwen2").name, get("opt").norm
    ('llama', 'layernorm')
"""

from __future__ import annotations

import importlib
import pkgutil

from flexgen_graph.families.base import Family, UnsupportedModelError


def _discover() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name != "base":
            fam = importlib.import_module(f"{__name__}.{m.name}").FAMILY
            assert fam.name not in out, f"two families named {fam.name!r}"
            out[fam.name] = fam
    return out


FAMILIES: dict[str, Family] = _discover()
BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES.values() for mt in f.model_types}
assert len(BY_MODEL_TYPE) == sum(len(f.model_types) for f in FAMILIES.values()), "a model_type read by two families"


def get(name: str) -> Family:
    """The family a spec names (ModelSpec.family); plan files and manifests are checked against it."""
    return FAMILIES[name]


def for_model_type(model_type: object) -> Family:
    try:
        return BY_MODEL_TYPE[model_type]  # type: ignore[index]
    except (KeyError, TypeError):
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(BY_MODEL_TYPE)})") from None
