"""Prompt and chat formats, as text and special-token names. The tokenizer turns them into ids and loss
masks (Tokenizer.encode_chat); everything that builds a prompt (fine-tuning, chat CLI, server) goes
through it, so training and inference can never disagree about a format."""

from __future__ import annotations

from typing import Mapping, Sequence

from gptforge.common import UserError

# Each turn is <|role|> content <|end|>. Roles are special tokens, so a user typing "<|user|>" stays text.
CHAT_ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in CHAT_ROLES}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)


def check_messages(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
    """Validate chat messages ({'role', 'content'}) and return (role, content) pairs."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise UserError("a conversation must be a non-empty list of {'role', 'content'} messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UserError(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise UserError(f"message {i} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"message {i} content must be a string, got {type(content).__name__}")
        pairs.append((role, content))
    return pairs
