"""DESIGN.md's rule: layers import downward only, and heavy optional libraries only where used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llamaforge"

# Lower numbers are lower layers; a module may import only from strictly lower layers (or its own package).
LAYERS = {
    "errors": 0, "openmp": 0, "hugepages": 0,
    "config": 1, "progress": 1, "kv_blocks": 1,
    "model": 2, "tokenizer": 2, "sampling": 2,
    "quantize": 3,  # its fused decode runs a model
    "structured": 3,  # grammars over a tokenizer's vocabulary
    "chat": 4, "generate": 4, "lora": 4, "checkpoint": 4,
    "adapters": 5,  # serves lora's adapters on a model
    "api": 6,
    "engine": 7,
    "server": 8, "finetune": 8, "eval": 8,
    "cli": 9,
    "__main__": 10, "__init__": 10,
}
OPTIONAL_HEAVY = {"transformers", "fastapi", "uvicorn", "starlette", "prometheus_client", "gguf", "lm_eval",
                  "bitsandbytes", "peft", "datasets", "llguidance"}
# Where each optional library may be imported (its extra's own packages). lm_eval is for tests and benchmarks only.
ALLOWED_HEAVY = {"fastapi": ("server",), "uvicorn": ("server",), "starlette": ("server",),
                 "prometheus_client": ("server",), "datasets": ("finetune", "eval"), "gguf": ("checkpoint",),
                 "llguidance": ("structured",)}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def component(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_has_a_layer() -> None:
    unknown = {component(p) for p in PACKAGE.rglob("*.py")} - set(LAYERS)
    assert not unknown, f"add these to LAYERS in {__file__}: {unknown}"


def test_imports_point_downward() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        own = component(path)
        for module in imports_of(path):
            if not module.startswith("llamaforge."):
                continue
            target = module.split(".")[1]
            if target != own and LAYERS[target] >= LAYERS[own]:
                violations.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not violations


def test_core_never_imports_heavy_optional_libraries() -> None:
    offenders = [f"{p.relative_to(PACKAGE)}: {m}" for p in PACKAGE.rglob("*.py") for m in imports_of(p)
                 if m.split(".")[0] in OPTIONAL_HEAVY and component(p) not in ALLOWED_HEAVY.get(m.split(".")[0], ())]
    assert not offenders


def test_loading_the_api_does_not_import_torch_compile_machinery() -> None:
    """torch._dynamo (and sympy with it) costs 1.5 s and ~80 MB: `load` and the CLI import it only to compile."""
    code = "import sys, llamaforge.api, llamaforge.cli, llamaforge.engine; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
