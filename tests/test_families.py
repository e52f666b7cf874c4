"""Model families: one module each (flexgen_graph.families), whose table of tensors agrees with
transformers' models, each replayed against transformers; no other module branches on a family's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from flexgen_graph import families
from flexgen_graph.families.base import Family
from flexgen_graph.spec import ModelSpec, spec_from_config
from tests.test_kernels import FAMILIES as REPLAYED  # model_type -> the tiny model test_kernels replays

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_model_type_is_replayed_against_transformers():
    # adding a family module without its tiny model in test_kernels fails here
    assert set(families.BY_MODEL_TYPE) == set(REPLAYED)
    assert all(isinstance(f, Family) for f in families.FAMILIES.values())


@pytest.mark.parametrize("model_type", sorted(families.BY_MODEL_TYPE))
def test_the_family_table_names_and_shapes_every_checkpoint_tensor(model_type):
    torch.manual_seed(0)
    model = REPLAYED[model_type]()
    spec = spec_from_config(model.config)
    assert spec.model_type == model_type and spec.traits is families.for_model_type(model_type)
    ours = {w.hf: w.shape for j in range(spec.num_graph_layers) for w in spec.checkpoint_tensors(j)}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {w.hf for j in range(spec.num_graph_layers) for w in spec.checkpoint_tensors(j) if w.linear} == linear
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_a_spec_naming_another_familys_model_type_is_refused():
    d = spec_from_config(REPLAYED["qwen2"]().config).to_dict()
    with pytest.raises(ValueError, match="model_type 'qwen2' is not one the opt family reads"):
        ModelSpec.from_dict({**d, "family": "opt"})
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        ModelSpec.from_dict({**d, "family": "gpt2"})


def _names_a_family(node: ast.Compare) -> bool:
    """`x.family == "opt"`, `spec.model_type in ("llama", ...)`: a family's name compared with a string."""
    sides = [node.left, *node.comparators]
    named = any(isinstance(s, ast.Attribute) and s.attr in ("family", "model_type") for s in sides)
    strings = any(isinstance(s, ast.Constant) and isinstance(s.value, str)
                  or isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(isinstance(e, ast.Constant) for e in s.elts)
                  for s in sides)
    return named and strings


def test_no_module_outside_the_families_branches_on_a_family_name():
    bad = []
    for pkg in ("flexgen_graph", "planner", "runtime"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "families" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and _names_a_family(node):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "behaviour selected by a family's name, not by spec fields: " + ", ".join(bad)
