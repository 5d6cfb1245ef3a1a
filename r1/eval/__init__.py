"""Evaluation metrics of the R1 paper: pass@1 averaged over k samples, and cons@k majority vote."""

from r1.eval.metrics import EvalSummary, majority_answer, summarize_problem

__all__ = ["EvalSummary", "majority_answer", "summarize_problem"]
