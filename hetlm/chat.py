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


def chat_pieces(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The rendering of ``messages`` as consecutive (text, is_reply) pieces; joined, they are ``render_chat``'s text.

    A reply piece is what the model writes after an "Assistant:" label: a space, the content and the blank
    line that ends the turn. Everything else (labels, other roles' turns) is merged into prompt pieces that
    end right after "Assistant:", which is where a served prompt ends, so a prompt piece encoded on its own
    gives the tokens the server gives the same conversation.
    """
    pieces: list[tuple[str, bool]] = []
    prompt = ""
    for message in messages:
        label = CHAT_ROLES[message["role"]]
        if label == "Assistant":
            pieces.append((prompt + "Assistant:", False))
            pieces.append((f" {message['content']}\n\n", True))
            prompt = ""
        else:
            prompt += f"{label}: {message['content']}\n\n"
    if add_generation_prompt:
        prompt += "Assistant:"
    if prompt:
        pieces.append((prompt, False))
    return pieces


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Messages ({"role", "content"}) as one prompt: "Role: content" blocks separated by blank lines."""
    return "".join(text for text, _ in chat_pieces(messages, add_generation_prompt))
