"""The config files' own rules: each starts with a docstring holding the command that runs it, and each VARIANTS
table uses only the short keys latentdiff.config_blocks.VARIANT_KEYS explains."""

import ast
import glob
import os

import pytest

from latentdiff.config_blocks import VARIANT_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def variant_keys(path: str) -> set[str]:
    """The keys of every row of the module-level VARIANTS table of a config file (empty set without one)."""
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "VARIANTS":
            return {kw.arg for row in node.value.values for kw in row.keywords}
    return set()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_has_its_command_and_explained_variant_keys(path):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    assert f"python train.py --config configs/{os.path.basename(path)}:" in doc
    assert variant_keys(path) <= set(VARIANT_KEYS), sorted(variant_keys(path) - set(VARIANT_KEYS))


def test_variant_keys_check_can_fail(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('VARIANTS = {"tiny": dict(mc=1, zz=2)}\n')
    assert variant_keys(str(path)) - set(VARIANT_KEYS) == {"zz"}
