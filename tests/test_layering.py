"""Arrows point down only: no module under spp_jax/ imports a layer above it (imports read with ast)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spp_jax")

# Layers, lowest first (DESIGN.md, "The next shape"); the longest matching prefix decides.
# A module may import its own layer and the ones below it.
RANKS = {
    "spp_jax.errors": 0, "spp_jax.atomic": 0, "spp_jax.bins": 0, "spp_jax.binmax": 0, "spp_jax.xla_options": 0,
    "spp_jax.host_memory": 0,
    "spp_jax.native": 1,  # the native CPU kernels: build (atomic), FFI registration, their ops
    "spp_jax.geometry": 1, "spp_jax.pooling": 1,
    "spp_jax.roi": 2,
    "spp_jax": 3, "spp_jax.models": 3,  # the package itself re-exports the core API
    "spp_jax.data": 4, "spp_jax.report": 4, "spp_jax.seedstats": 4, "spp_jax.svm": 4, "spp_jax.voc_ap": 4,
    "spp_jax.serve": 5,
    # The testing protocols; the training config (it names the protocols), state, steps, checkpoints.
    "spp_jax.evaluate": 6, "spp_jax.train": 6,
    "spp_jax.pretrained": 7,
    # Training runs (they test with spp_jax.evaluate).
    "spp_jax.train.loop": 8, "spp_jax.train.experiment": 8, "spp_jax.train.testing": 8,
    # Grids of training runs (Table 2, the claims) and their tables.
    "spp_jax.train.grid": 8, "spp_jax.train.claims": 8, "spp_jax.train.object_size": 8,
    "spp_jax.train.controlled": 8,
    "spp_jax.transfer": 9, "spp_jax.detection": 9,
}
# Same-or-lower layer, and still forbidden: transfer and detection load networks through
# spp_jax.pretrained, never through a training run, and transfer does not use detection.
FORBIDDEN = {
    "spp_jax.transfer": ("spp_jax.detection", "spp_jax.train.loop", "spp_jax.train.experiment",
                         "spp_jax.train.testing"),
    "spp_jax.detection": ("spp_jax.transfer", "spp_jax.train.loop", "spp_jax.train.experiment",
                          "spp_jax.train.testing"),
    "spp_jax.pretrained": ("spp_jax.train.loop", "spp_jax.train.experiment", "spp_jax.train.testing"),
}
OUTSIDE = ("experiments", "bench", "tests")  # spp_jax never imports these


def _match(name, table):
    keys = [k for k in table if name == k or name.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def rank(module):
    key = _match(module, RANKS)
    if key is None:
        raise AssertionError(f"{module} has no layer in tests/test_layering.py: add it to RANKS")
    return RANKS[key]


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports(source, module):
    """Every module ``source`` imports (at any depth, inside functions too), absolute names."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                node_mod = ".".join(base + ([node.module] if node.module else []))
            else:
                node_mod = node.module
            for a in node.names:  # "from pkg import sub" imports the submodule when there is one
                sub = f"{node_mod}.{a.name}"
                is_module = os.path.exists(os.path.join(os.path.dirname(ROOT), *sub.split(".")) + ".py") or \
                    os.path.isdir(os.path.join(os.path.dirname(ROOT), *sub.split(".")))
                out.append(sub if is_module else node_mod)
    return out


def violations(source, module):
    bad = []
    for target in imports(source, module):
        top = target.split(".")[0]
        if top in OUTSIDE:
            bad.append(f"{module} imports {target} (outside the library)")
        if top != "spp_jax":
            continue
        if rank(target) > rank(module):
            bad.append(f"{module} (layer {rank(module)}) imports {target} (layer {rank(target)})")
        src_key = _match(module, FORBIDDEN)
        if src_key and _match(target, {k: 0 for k in FORBIDDEN[src_key]}):
            bad.append(f"{module} imports {target}, which {src_key} must not use")
    return bad


def _library_files():
    for d, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def test_no_module_imports_a_layer_above_it():
    bad = []
    for path in _library_files():
        with open(path) as f:
            bad += violations(f.read(), _module_name(path))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, found", [
    ("spp_jax.serve", "from spp_jax.transfer import features", "layer 5) imports spp_jax.transfer.features"),
    ("spp_jax.transfer.run", "def f():\n    from spp_jax.detection.voc_eval import voc_ap",
     "which spp_jax.transfer must not use"),
    ("spp_jax.detection.backbone", "import spp_jax.train.experiment", "which spp_jax.detection must not use"),
    ("spp_jax.models.sppnet", "from spp_jax import serve", "imports spp_jax.serve"),
    ("spp_jax.roi", "from experiments import voc_det", "outside the library"),
])
def test_the_check_catches_upward_imports(module, source, found):
    assert any(found in v for v in violations(source, module))
    assert violations("from spp_jax.models import layers as L\nimport numpy", "spp_jax.serve") == []
