"""The chat template: how chat messages become one prompt, shared by the server and deployed bundles.

The model is a base model, so the roles are plain text labels it can pick up from a few examples. The
server renders messages with ``render_chat`` and stops at ``CHAT_STOP``; a bundle's tokenizer_config.json
carries ``CHAT_TEMPLATE``, the same rendering as a Jinja template, so transformers' apply_chat_template
gives the same text. ``Conversation`` is a terminal chat's history (``hetlm chat``), rendered the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hetlm.reporting import NullReporter, Reporter
from hetlm.sampling import encode_prompt
from hetlm.sampling_settings import SamplingSettings

if TYPE_CHECKING:
    import torch

    from hetlm.sampling import Sampler

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


class Conversation:
    """A chat with one model: the history, and each reply sampled from it and streamed.

    A reply is sampled from the rendered history with ``CHAT_STOP`` added to the settings' stop strings, so it ends
    where the model starts the next turn itself. Its text is kept stripped of surrounding whitespace, as
    ``render_chat`` separates the turns itself, and streamed the same way: what the caller shows is what the history
    holds. All replies draw from one generator, so a seed makes the whole chat reproducible.
    """

    def __init__(self, sampler: Sampler, settings: SamplingSettings, generator: torch.Generator,
                 system: str | None = None) -> None:
        self.sampler = sampler
        stops = settings.stop + tuple(s for s in CHAT_STOP if s not in settings.stop)
        self.settings = dataclasses.replace(settings, stop=stops, num_samples=1)
        self.generator = generator
        self.system = system
        # User and assistant messages, alternating, oldest first.
        self.turns: list[dict[str, str]] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    @property
    def reply_room(self) -> int:
        """Tokens the history leaves free for a reply: max_new_tokens, at most half the context, so that the default
        budget of 256 tokens, more than many small models' context, still leaves room for history. A longer reply goes
        on, as generate's does, with the window sliding."""
        return min(self.settings.max_new_tokens, self.sampler.context_length // 2)

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns = []

    def prompt_ids(self) -> tuple[list[int], int]:
        """The history rendered and encoded for the next reply, and how many of the oldest turns were dropped (from
        ``turns`` too) so that it leaves ``reply_room`` tokens of the context. The newest message is never dropped."""
        dropped = 0
        while True:
            ids = encode_prompt(self.sampler.tokenizer, render_chat(self.messages, add_generation_prompt=True))
            if len(ids) + self.reply_room <= self.sampler.context_length or len(self.turns) <= 1:
                return ids, dropped
            # One turn is a user message and the reply to it.
            del self.turns[:2]
            dropped += 1

    def reply(self, text: str, reporter: Reporter = NullReporter()) -> Iterator[str]:
        """Once iterated: add the user's ``text`` and stream the reply's text. The reply joins the history when the
        iterator ends, is closed or is interrupted (Ctrl-C), with what it streamed so far."""
        self.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt_ids()
        except Exception:
            # A message that cannot be encoded is not sent, and the turns stay user, assistant, user...
            self.turns.pop()
            raise
        if dropped:
            reporter.info(f"history trimmed: the oldest {dropped} turn{'s' if dropped > 1 else ''} dropped to fit the "
                          f"context of {self.sampler.context_length} tokens")
        shown: list[str] = []
        generation = self.sampler.stream(ids, self.settings, self.generator, reporter)
        try:
            # Whitespace is held back until text follows it: at the end of the reply it is dropped.
            held = ""
            for chunk in generation:
                piece = held + chunk.text
                if not shown:
                    piece = piece.lstrip()
                body = piece.rstrip()
                held = piece[len(body):]
                if body:
                    shown.append(body)
                    yield body
        finally:
            generation.close()
            self.turns.append({"role": "assistant", "content": "".join(shown)})
