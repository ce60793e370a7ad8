"""Instruction records -> conversation turns -> token ids and the response (loss) mask.

Template, with the tokenizer's special tokens (mask 1 only on assistant content and its closing EOD):

    <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{assistant}<|endoftext|>
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_emoe.data.tokenizer import encode
from megatron_emoe.errors import UsageError

SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# Role names of chat (`role`) and ShareGPT/SlimOrca (`from`) messages.
ROLE_ALIASES = {
    "system": "system", "user": "user", "assistant": "assistant",
    "human": "user", "gpt": "assistant", "model": "assistant",
}
MESSAGE_KEYS = ("messages", "conversations")
# (prompt, response) column pairs tried in order: Alpaca/SlimOrca-style, Magicoder, MetaMath, others.
PAIR_KEYS = (
    ("instruction", "output"), ("instruction", "response"), ("query", "response"),
    ("problem", "solution"), ("question", "response"), ("prompt", "response"),
    ("prompt", "completion"), ("question", "answer"),
)
SYSTEM_KEYS = ("system", "system_prompt")
INPUT_KEY = "input"  # Alpaca's optional context, appended to the instruction


@dataclass(frozen=True)
class ConversationFields:
    """Which columns hold a conversation: a `messages` list, or prompt/response (+system, input)."""

    messages: str | None = None
    prompt: str | None = None
    response: str | None = None
    system: str | None = None
    input: str | None = None

    def describe(self) -> str:
        """One line for logs, e.g. `messages` or `prompt=query, response=response`."""
        if self.messages:
            return f"messages={self.messages}"
        parts = [f"prompt={self.prompt}", f"response={self.response}"]
        parts += [f"{k}={v}" for k, v in (("input", self.input), ("system", self.system)) if v]
        return ", ".join(parts)


def detect_fields(
    columns: Sequence[str],
    *,
    messages_key: str | None = None,
    prompt_key: str | None = None,
    response_key: str | None = None,
    system_key: str | None = None,
) -> ConversationFields:
    """Pick the conversation columns: the flags where given, else the first known layout present."""
    columns = list(columns)

    def need(key, flag):
        if key not in columns:
            raise UsageError(f"{flag}: column {key!r} is not in the data (columns: {', '.join(columns)})")
        return key

    if system_key is not None:
        need(system_key, "--system-key")
    if messages_key is not None:
        return ConversationFields(messages=need(messages_key, "--messages-key"))
    if (prompt_key is None) != (response_key is None):
        raise UsageError("--prompt-key and --response-key go together; give both or neither")
    system = system_key or next((k for k in SYSTEM_KEYS if k in columns), None)
    if prompt_key is not None:
        return ConversationFields(
            prompt=need(prompt_key, "--prompt-key"), response=need(response_key, "--response-key"),
            system=system,
        )
    for key in MESSAGE_KEYS:
        if key in columns:
            return ConversationFields(messages=key)
    for prompt, response in PAIR_KEYS:
        if prompt in columns and response in columns:
            extra = INPUT_KEY if prompt == "instruction" and INPUT_KEY in columns else None
            return ConversationFields(prompt=prompt, response=response, system=system, input=extra)
    known = ", ".join(MESSAGE_KEYS) + "; or pairs " + ", ".join(f"{p}/{r}" for p, r in PAIR_KEYS)
    raise UsageError(
        f"--sft: cannot find the conversation in columns {', '.join(columns)} (known: {known}); "
        "name them with --messages-key, or --prompt-key and --response-key"
    )


def record_turns(record: dict, fields: ConversationFields) -> list[tuple[str, str]]:
    """[(role, content)] of one record, roles in system/user/assistant; turns after the last answer dropped.

    A record whose messages, prompt or response is absent or null has no turns.
    """
    if fields.messages:
        turns = [_message_turn(m) for m in record[fields.messages] or []]
    else:
        if record.get(fields.prompt) is None or record.get(fields.response) is None:
            return []  # lacks the prompt or the response: no conversation (skipped, counted as missing)
        prompt = _text(record[fields.prompt])
        if fields.input and _text(record.get(fields.input)):
            prompt = f"{prompt}\n\n{_text(record[fields.input])}"
        turns = [("user", prompt), ("assistant", _text(record[fields.response]))]
        if fields.system and _text(record.get(fields.system)):
            turns.insert(0, ("system", _text(record[fields.system])))
    last_answer = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    return turns[: last_answer + 1]


def render_batch(
    tokenizer, conversations: list[list[tuple[str, str]]], special: dict[str, int], eod: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids `[tokens]` and response masks `[tokens]` of conversations (one tokenizer call)."""
    pieces: list[list[tuple[str, object]]] = []  # per conversation: ("id", id) or ("text", idx)
    texts: list[str] = []
    masks_of_text: list[int] = []

    def text(piece: str, mask: int):
        texts.append(piece)
        masks_of_text.append(mask)
        return ("text", len(texts) - 1)

    for turns in conversations:
        parts = []
        for role, content in turns:
            parts.append(("id", special[ROLE_TOKENS[role]], 0))
            if role == "assistant":
                parts += [text("\n", 0), text(content, 1), ("id", eod, 1)]
            else:
                parts.append(text(f"\n{content}\n", 0))
        pieces.append(parts)
    encoded = encode(tokenizer, texts) if texts else []
    all_ids, all_masks = [], []
    for parts in pieces:
        ids, mask = [], []
        for part in parts:
            if part[0] == "id":
                ids.append(part[1])
                mask.append(part[2])
            else:
                piece = encoded[part[1]]
                ids += piece
                mask += [masks_of_text[part[1]]] * len(piece)
        all_ids.append(ids)
        all_masks.append(mask)
    return all_ids, all_masks


def _message_turn(message) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise UsageError(f"--sft: a message must be a mapping with role/content, got {message!r:.80}")
    role = message.get("role", message.get("from"))
    content = message.get("content", message.get("value"))
    if role not in ROLE_ALIASES:
        raise UsageError(
            f"--sft: message role {role!r} is not one of system, user, assistant "
            "(or ShareGPT's human, gpt)"
        )
    return ROLE_ALIASES[role], _text(content)


def _text(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"--sft: expected text in a conversation field, got {type(value).__name__}")
    return value
