"""The call-based tests' code, rewritten for the harness (``harness.py``): every comparison, truth test (assert, if,
while, ``and``/``or``/``not``, conditional expressions, comprehension filters) and arithmetic operator goes through the
harness's helpers, which accept only values of trusted builtin types. ``is`` / ``is not`` stay as written.

Done here, in the worker, once per distinct test text (a prompt's G samples share it), and shipped to the sandbox as
source: the sandbox's interpreter then needs no ``ast`` (its import is a third of a call-based run's start).
"""

from __future__ import annotations

import ast
from functools import lru_cache


class _Rewrite(ast.NodeTransformer):
    """Comparisons, truth tests and arithmetic of the tests' code through the harness's helpers."""

    @staticmethod
    def _call(name, *args):
        return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=list(args), keywords=[])

    @staticmethod
    def _thunk(expr):
        return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                             kwarg=None, defaults=[]), body=expr)

    def _test(self, node):
        return self._call("__r1_truth__", self.visit(node))

    def visit_Compare(self, node):
        self.generic_visit(node)
        if all(type(op).__name__ in ("Is", "IsNot") for op in node.ops):
            return node  # identity cannot lie
        args = [node.left]
        for op, right in zip(node.ops, node.comparators):
            args += [ast.Constant(value=type(op).__name__), self._thunk(right)]
        return self._call("__r1_compare__", *args)

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        return self._call("__r1_and__" if isinstance(node.op, ast.And) else "__r1_or__",
                          *[self._thunk(v) for v in node.values])

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            return self._call("__r1_not__", node.operand)
        return self._call("__r1_unaryop__", ast.Constant(value=type(node.op).__name__), node.operand)

    def visit_BinOp(self, node):
        self.generic_visit(node)
        return self._call("__r1_binop__", ast.Constant(value=type(node.op).__name__), node.left, node.right)

    def visit_Assert(self, node):
        return ast.copy_location(ast.Assert(test=self._test(node.test),
                                            msg=self.visit(node.msg) if node.msg else None), node)

    def visit_If(self, node):
        node.test = self._test(node.test)
        node.body = [self.visit(n) for n in node.body]
        node.orelse = [self.visit(n) for n in node.orelse]
        return node

    visit_While = visit_If

    def visit_IfExp(self, node):
        return ast.copy_location(ast.IfExp(test=self._test(node.test), body=self.visit(node.body),
                                           orelse=self.visit(node.orelse)), node)

    def visit_comprehension(self, node):
        self.generic_visit(node)
        node.ifs = [self._call("__r1_truth__", cond) for cond in node.ifs]
        return node


@lru_cache(maxsize=4096)
def rewrite_tests(source: str) -> str:
    """``source`` with its checks through the harness; unchanged if it does not parse (the harness then reports the
    SyntaxError as the run's error: a broken test passes nothing)."""
    try:
        tree = ast.parse(source, "<tests>")
    except (SyntaxError, ValueError):
        return source
    return ast.unparse(ast.fix_missing_locations(_Rewrite().visit(tree)))
