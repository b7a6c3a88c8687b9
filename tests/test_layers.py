"""The package's architecture, checked on its source: layers without import cycles, one module that knows
the checkpoint layout, and families that meet their contract and are asked for capabilities, not names."""

import ast
from pathlib import Path

import pytest
import torch

from gentrain import models
from gentrain.models import FAMILIES, build
from gentrain.models.family import PROTOCOLS, Family

PACKAGE = Path(__import__("gentrain").__file__).parent


def modules() -> dict[str, ast.Module]:
    """Every module of the package by its dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, at the top or inside a function: `from a import b` is an
    import of a.b where that is a module, else of a."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    trees = modules()
    graph = {name: imports(name, tree, set(trees)) for name, tree in trees.items()}
    assert cycles(graph) == []


def test_no_library_module_imports_a_verb():
    trees = modules()
    for name, tree in trees.items():
        if name.startswith("gentrain.commands") or name in ("gentrain.cli", "gentrain.__main__"):
            continue
        verbs = {m for m in imports(name, tree, set(trees)) if m.startswith("gentrain.commands") or m == "gentrain.cli"}
        assert not verbs, f"{name} imports {verbs}"


def outside(package_part: str):
    for name, tree in modules().items():
        if not name.startswith(package_part):
            yield name, tree


def test_only_checkpoint_py_indexes_a_checkpoint():
    """A checkpoint is read through checkpoint.Checkpoint's attributes everywhere else."""
    for name, tree in outside("gentrain.checkpoint"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and "ckpt" in node.value.id:
                raise AssertionError(f"{name}:{node.lineno} indexes {node.value.id}")


def test_families_are_asked_for_capabilities_not_probed_or_named():
    names = set(FAMILIES)
    for name, tree in outside("gentrain.models"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                target = node.args[0]
                assert not (isinstance(target, ast.Name) and target.id == "model"), f"{name}:{node.lineno} probes model"
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                for c in constants:
                    assert c not in names, f"{name}:{node.lineno} compares with the family name {c!r}"
                for c in [node.left, *node.comparators]:
                    if isinstance(c, ast.Tuple):
                        assert not names & {e.value for e in c.elts if isinstance(e, ast.Constant)}, \
                            f"{name}:{node.lineno} compares with family names"


@pytest.mark.parametrize("cfg", [
    {"family": "gan"}, {"family": "gan", "ema": 0.99, "r1": 1.0, "loss": "wgan"}, {"family": "vae"},
    {"family": "vae", "arch": "resnet", "conditional": True}, {"family": "vqvae", "ch": 8, "prior_ch": 8},
])
def test_every_family_meets_the_contract_and_has_what_it_declares(cfg):
    model = build(cfg, 1, 28, 10)
    assert isinstance(model, Family)
    assert set(model.optimizers) == {p.opt for p in model.phases}
    assert {o for o in model.optimizers if list(model.phase_parameters(o))} == set(model.optimizers)
    for capability in model.capabilities:
        assert isinstance(model, PROTOCOLS[capability]), capability
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    y = torch.arange(4) if model.num_classes else None
    for phase in model.phases:
        loss, stats = model.loss(phase.name, x, y, 0)
        assert loss.ndim == 0 and torch.isfinite(loss) and all(k.count("/") <= 1 for k in stats)
        model.after_step(phase.name, 0)
    assert models.generate(model.eval(), model.noise(3), torch.device("cpu"), 2, y[:3] if y is not None else None).shape \
        == (3, 1, 28, 28)
