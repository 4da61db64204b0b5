"""The arithmetic of hyper-parameter expressions (`heads * head_dim`) in the family tables."""
from __future__ import annotations

import ast
import operator

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.truediv}


def evaluate(expr: str, names: dict):
    """`heads * head_dim`-style arithmetic over `names` (KeyError names a missing one)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression {expr!r}")
    return walk(ast.parse(expr, mode="eval"))
