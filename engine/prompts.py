"""Turning prompts (text, token ids, chat messages) into token ids, with clear errors."""
from __future__ import annotations

from typing import Any, Dict, List, Union

ROLES = ("system", "user", "assistant", "tool")

Messages = List[Dict[str, Any]]
Prompt = Union[str, List[int], Messages]


def is_messages(p: Any) -> bool:
    return isinstance(p, list) and len(p) > 0 and all(isinstance(m, dict) for m in p)


def validate_messages(messages: Messages) -> None:
    if not messages:
        raise ValueError("messages: must hold at least one message")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: {role!r} is not one of {list(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string")


def encode_prompt(tokenizer, prompt: Prompt) -> List[int]:
    if isinstance(prompt, str):
        if prompt == "":
            raise ValueError("prompt: must not be empty")
        return tokenizer.encode(prompt, add_special_tokens=True)
    if is_messages(prompt):
        validate_messages(prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages: this model's tokenizer has no chat template; send a plain prompt")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        vocab = len(tokenizer)
        bad = [t for t in prompt if t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"prompt: token ids must lie in [0, {vocab}); got {bad[:4]}")
        return list(prompt)
    raise ValueError("prompt: must be a string, a list of token ids, or a list of {role, content} messages")
