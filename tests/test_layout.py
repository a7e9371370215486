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
# Model code is pure: local files in, modules out (no Ray, DeepSpeed, collectives or storage).
DISTRIBUTION = {"ray", "deepspeed", "torch.distributed", "cluster"}
FOLDERS = {"cluster": "cluster", "jobs": "jobs", "serving": "serving", "tuning": "tuning"}


def imported_modules(path: Path) -> set[str]:
    """What `path` imports, module level or inside functions, with raygen's subpackages
    named by their folders (`raygen.jobs.spec` -> `jobs.spec`, `raygen.cli` -> `raygen.cli`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {_folder_name(n) for n in names}


def _folder_name(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "raygen" and len(parts) > 1 and parts[1] in LAYERS:
        return ".".join(parts[1:])
    return module


def python_files():
    return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]


def test_the_folders_are_imported_only_as_raygen_subpackages():
    """`import jobs` would find another distribution's `jobs` first, or none once installed."""
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in set(LAYERS) - {"raygen"}, (
                    f"{path.relative_to(ROOT)} imports {name}: write raygen.{name}"
                )


def test_the_wheel_installs_one_package_that_imports_from_anywhere(tmp_path):
    """A built wheel puts only `raygen/` into site-packages, with the folders inside it and
    their data files; installed there, it imports without this source tree."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools writes build/ beside the sources
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "runs", "__pycache__", "*.egg-info", ".*_cache"
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("raygen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"raygen"}, tops
    for expected in (
        "raygen/jobs/spec.py",
        "raygen/jobs/models/causal_lm.py",
        "raygen/jobs/examples/code-lm-tiny.yaml",
        "raygen/serving/examples/audit-eval.parquet",
        "raygen/cluster/clouds/gcp.yaml",
        "raygen/tuning/examples/code-lm-lr.yaml",
    ):
        assert expected in names, expected
    for folder in ("raygen", "jobs", "cluster", "serving", "tuning"):  # every package
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.relative_to(ROOT if folder == "raygen" else ROOT / folder)
            path = str(inside if folder == "raygen" else Path("raygen", folder, inside))
            assert path in names, f"{path} is not in the wheel: list its package in pyproject"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import sys; sys.path.insert(0, 'site'); import raygen.cli, raygen.jobs.spec, "
        "raygen.serving.spec; print(raygen.cli.__file__); print(raygen.jobs.spec.__file__); "
        "print(raygen.serving.spec.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.split():
        assert line.startswith(str(tmp_path / "site" / "raygen")), line


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


def module_name(path: Path) -> str:
    """`jobs/data/text.py` -> `raygen.jobs.data.text`; `raygen/cli.py` -> `raygen.cli`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "raygen" else ["raygen", *parts])


def test_no_import_cycles():
    """No module reaches itself through its imports, at module level or inside functions
    (an import inside a function hides a cycle only until that function runs)."""
    paths = [p for f in LAYERS for p in (ROOT / f).rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import mod`
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [], set(), done)
    assert not cycles, "\n".join(cycles)


def test_cli_and_specs_import_without_torch_or_ray():
    """The CLI, the specs, validation and the run directory's records answer without
    loading torch or Ray (`raygen train --check`, `raygen submit` start fast)."""
    code = (
        "import sys, raygen.cli, raygen.jobs.spec, raygen.jobs.loader, raygen.jobs.validate, "
        "raygen.jobs.run_dir, raygen.jobs.pretrained, raygen.serving.spec, raygen.tuning.spec; "
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
