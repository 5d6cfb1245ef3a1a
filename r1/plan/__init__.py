"""The run planner (``plan=true``): memory per GPU of each pool, step time, the node split (docs/plan.md)."""

from r1.plan.planner import Plan, make_plan
from r1.plan.render import render

__all__ = ["Plan", "make_plan", "render"]
