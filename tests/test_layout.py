"""The architecture rules of STYLE.md, checked by scanning imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imports flow one way: raygen -> tuning/serving -> jobs -> cluster.
LAYERS = {
    "cluster": set(),
    "jobs": {"cluster"},
    "tuning": {"cluster", "jobs"},
    "serving": {"cluster", "jobs"},
    "raygen": {"cluster", "jobs", "tuning", "serving"},
}
DISTRIBUTION = {"ray", "deepspeed", "torch.distributed"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_model_code_has_no_distribution_imports():
    for path in (ROOT / "jobs" / "models").rglob("*.py"):
        for name in imported_modules(path):
            assert not any(name == d or name.startswith(d + ".") for d in DISTRIBUTION), (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_imports_flow_one_way():
    for package, allowed in LAYERS.items():
        for path in (ROOT / package).rglob("*.py"):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    assert top in allowed, f"{path.relative_to(ROOT)} imports {name}"


def test_cli_and_specs_import_without_torch_or_ray():
    code = (
        "import sys, raygen.cli, jobs.spec, jobs.loader; "
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
