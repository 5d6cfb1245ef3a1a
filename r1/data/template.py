"""Prompt templates (``data.template``). ``r1_zero`` is Table 1 of the DeepSeek-R1 paper, verbatim; ``chat`` is the
tokenizer's own chat template (one user turn, then the assistant's generation prompt), the format instruct,
cold-started and distilled models speak."""

from __future__ import annotations

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "plain": "{prompt}"}
CHOICES = (*TEMPLATES, "chat")


def apply_template(prompt: str, template: str = "r1_zero", tokenizer=None) -> str:
    """The text the model sees before its response (``chat`` needs the model's tokenizer)."""
    if template == "chat":
        check_chat_template(tokenizer)
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    try:
        return TEMPLATES[template].format(prompt=prompt)
    except KeyError:
        raise ValueError(f"data.template={template!r}: choose one of {list(CHOICES)}") from None


def check_chat_template(tokenizer) -> None:
    """``data.template=chat`` needs a tokenizer that has one (base models usually have none)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None)
        raise ValueError(f"data.template=chat: the tokenizer of {name!r} has no chat template (a base model?); use "
                         "data.template=r1_zero or plain, or a model whose tokenizer_config.json has a chat_template")
