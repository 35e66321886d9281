"""The chat template: how chat messages become one prompt, shared by the server and deployed bundles.

The model is a base model, so the roles are plain text labels it can pick up from a few examples. The
server renders messages with ``render_chat`` and stops at ``CHAT_STOP``; a bundle's tokenizer_config.json
carries ``CHAT_TEMPLATE``, the same rendering as a Jinja template, so transformers' apply_chat_template
gives the same text.
"""

from __future__ import annotations

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ 'System: ' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' }}"
    "{% else %}{{ 'Assistant: ' }}{% endif %}"
    "{{ message['content'] }}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Where the model starts writing the next turn itself.
CHAT_STOP = ["\nUser:", "\nSystem:"]


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Messages ({"role", "content"}) as one prompt: "Role: content" blocks separated by blank lines."""
    text = "".join(f"{CHAT_ROLES[m['role']]}: {m['content']}\n\n" for m in messages)
    return text + "Assistant:" if add_generation_prompt else text
