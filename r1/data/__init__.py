"""Prompt data: the R1-Zero template, robust loading of prompt/answer files, and a resumable prompt sampler."""
