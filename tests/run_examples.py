"""Run documentation examples as a user would, in this fresh process: `python tests/run_examples.py spec.json out.json`.

spec.json: {name: {"source": str, "keep": [variable names], "meta": bool}}. Each example runs in its own
namespace; a last bare expression is evaluated and kept as "_" (what the REPL would show); printed text is
kept as "stdout". With "meta", it runs under `with torch.device("meta")` (full-size configs, no memory).
Tensors are written as nested lists, so the test can compare two runs (zamba2 and transformers).
"""

import ast
import contextlib
import io
import json
import sys

import torch


def plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def run(source: str, keep: list[str], meta: bool) -> dict:
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    namespace: dict = {"__name__": "__example__"}
    out = io.StringIO()
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), device:
        exec(compile(tree, "<example>", "exec"), namespace)
        shown = eval(compile(ast.Expression(last.value), "<example>", "eval"), namespace) if last else None
    result = {name: plain(namespace[name]) for name in keep}
    if "model" in namespace and hasattr(namespace["model"], "parameters"):
        result["num_parameters"] = sum(p.numel() for p in namespace["model"].parameters())
    return {**result, "_": plain(shown), "stdout": out.getvalue()}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    results = {name: run(e["source"], e["keep"], e.get("meta", False)) for name, e in spec.items()}
    open(sys.argv[2], "w").write(json.dumps(results))
