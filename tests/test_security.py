"""Static guarantees about how the code loads things: no pickle of untrusted input, no eval/exec,
models only through safetensors or weights_only loads, remote code only when a param says so."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("codex_ml", "stages", "tools", "bench") for p in (ROOT / d).rglob("*.py")]


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(getattr(f, "value", None), "id", "")
            yield node, owner, name


def test_no_eval_exec_pickle_or_unsafe_torch_load():
    bad = []
    for path in CODE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for m in mods):
                    bad.append(f"{path.name}: imports {mods}")
        for node, owner, name in calls(tree):
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                bad.append(f"{path.name}:{node.lineno}: {name}()")
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value):
                    bad.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                bad.append(f"{path.name}:{node.lineno}: yaml.{name} (use safe_load)")
    assert not bad, bad


def test_trust_remote_code_only_from_params():
    for path in CODE:
        for node, _, _ in calls(ast.parse(path.read_text())):
            for k in node.keywords:
                if k.arg == "trust_remote_code":
                    assert not (isinstance(k.value, ast.Constant) and k.value.value is True), \
                        f"{path}:{node.lineno} hard-codes trust_remote_code=True"
    from codex_ml.params import Params
    assert Params().model.trust_remote_code is False


def test_models_are_saved_as_safetensors():
    src = (ROOT / "codex_ml/training/pipeline.py").read_text()
    assert "safe_serialization=False" not in src
    assert not re.search(r"pytorch_model\.bin", src)
