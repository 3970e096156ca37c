"""The package's shape: imports point one way, model.py is pure math, importing gptforge is light."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO

PKG = REPO / "gptforge"

# Each module's layer; a module may import gptforge modules of its own layer or lower ones only.
LAYERS = {
    "gptforge": 0, "gptforge.config": 0, "gptforge.checks": 0, "gptforge.common": 0, "gptforge.files": 0,
    "gptforge.options": 0, "gptforge.terminal": 0, "gptforge.native": 0, "gptforge.quantize": 1,
    "gptforge.model": 1, "gptforge.tokenizer": 1, "gptforge.prompts": 1, "gptforge.lora": 1,
    "gptforge.data": 2,
    "gptforge.checkpoint": 3, "gptforge.trainer_state": 3,
    "gptforge.engine": 4, "gptforge.textgen": 4, "gptforge.interop": 4, "gptforge.eval": 4, "gptforge.client": 4,
    "gptforge.classify": 4, "gptforge.export": 4,
    "gptforge.train": 5,
    "gptforge.serve": 6, "gptforge.apps": 6, "gptforge.cli": 6, "gptforge.cli_errors": 6, "gptforge.cli_completion": 6, "gptforge.__main__": 7,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return LAYERS[name]
    raise AssertionError(f"{module} has no layer in tests/test_layout.py; add it")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {m for m in found if m.startswith("gptforge")}


def test_imports_point_one_way():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for dep in imported_modules(path):
            if layer_of(dep) > layer_of(module):
                bad.append(f"{module} imports {dep}")
    assert not bad, bad


def test_apps_stand_alone():
    """An app (gptforge/apps/) imports the library, never another app; only the CLI imports apps."""
    bad = []
    for path in PKG.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for dep in imported_modules(path):
            if not dep.startswith("gptforge.apps"):
                continue
            if module.startswith("gptforge.apps.") and dep != module:
                bad.append(f"app {module} imports {dep}")
            elif not module.startswith("gptforge.apps") and module != "gptforge.cli":
                bad.append(f"library module {module} imports {dep}")
    assert not bad, bad


def test_engine_speaks_tokens_only():
    """The engine takes SamplingParams and ids, never the CLI's SampleConfig or text (textgen converts)."""
    for path in (PKG / "engine").glob("*.py"):
        deps = imported_modules(path)
        assert not deps & {"gptforge.config", "gptforge.textgen", "gptforge.tokenizer"}, (path.name, deps)


def test_model_is_pure_math():
    imports = set()
    for node in ast.walk(ast.parse((PKG / "model.py").read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports |= {a.name for a in node.names} if isinstance(node, ast.Import) else {node.module}
    # no torch.utils.checkpoint: activation checkpointing is applied from outside (train/parallelize.py)
    assert imports <= {"__future__", "math", "typing", "torch", "torch.nn", "torch.nn.functional",
                       "gptforge.config"}, imports
    source = (PKG / "model.py").read_text()
    for word in ("print(", "open(", "logging", "distributed"):
        assert word not in source


def test_distributed_code_lives_in_train():
    """Process groups are set up in common.py; everything else distributed (DDP, FSDP, sharded checkpoints)
    is applied from outside the model, in gptforge/train/."""
    found = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "torch.distributed" in p.read_text()}
    assert {f for f in found if not f.startswith("train/")} <= {"common.py"}, found


def test_import_gptforge_is_light():
    """Importing the package and building the whole parser loads no heavy library: `gptforge --help` is quick."""
    code = ("import sys, gptforge, gptforge.config, gptforge.cli; gptforge.cli.build_parser(); "
            "print(','.join(m for m in ('torch','matplotlib','datasets','transformers','tiktoken') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at start-up: {out.stdout}"


def test_modules_stay_small():
    big = [f"{p.name}: {n}" for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500]
    assert not big, big


def test_the_layer_picture_in_developers_md_is_the_enforced_one():
    """DEVELOPERS.md draws the layers for newcomers; a picture that drifts from LAYERS misleads them."""
    text = (REPO / "DEVELOPERS.md").read_text(encoding="utf-8")
    picture = text.split("## How the code is laid out", 1)[1].split("```", 2)[1]
    drawn = [re.split(r"\s{3,}", line.strip())[0].split() for line in picture.splitlines()
             if line.strip() and line.strip() != "|"]
    enforced = sorted(set(LAYERS.values()) - {LAYERS["gptforge.__main__"]})
    assert len(drawn) == len(enforced), drawn
    for layer, names in zip(enforced, drawn):
        expected = {m.removeprefix("gptforge.") for m, n in LAYERS.items() if n == layer and m.count(".") == 1}
        assert set(names) == expected, f"layer {layer}: drawn {sorted(names)}, enforced {sorted(expected)}"
