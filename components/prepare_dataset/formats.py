"""Turn one record into prompt/response text segments, per `data.format`.

A format returns a list of `(text, trainable)` segments: the loss is computed on trainable
segments only (the response, or every assistant turn of a chat). Missing, null or ill-typed
fields raise `RowError` naming the field; the caller adds the row's location.
"""

from __future__ import annotations

import string
from collections.abc import Callable

Segments = list[tuple[str, bool]]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SAMSUM_PROMPT = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"

# Fields each format needs (a CSV or Parquet file must have these columns).
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "samsum": ("dialogue", "summary"),
    "chat": ("messages",),
}


class RowError(ValueError):
    """A record that cannot be used; `reason` is the key counted in stats.json."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def text_field(row: dict, name: str, optional: bool = False) -> str:
    if name not in row:
        if optional:
            return ""
        raise RowError(f"missing field {name!r}", f"missing_field:{name}")
    value = row[name]
    if value is None:
        if optional:
            return ""
        raise RowError(f"field {name!r} is null", f"null_field:{name}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowError(
            f"field {name!r} must be text, got {type(value).__name__}", f"bad_type:{name}"
        )
    return str(value)


def normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def instruction_with_context(row: dict, context_field: str, response_field: str) -> Segments:
    """Alpaca's prompt, with or without its input block, for alpaca and dolly records."""
    instruction = normalize(text_field(row, "instruction")).strip()
    context = normalize(text_field(row, context_field, optional=True)).strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return [
        (template.format(instruction=instruction, input=context), False),
        (normalize(text_field(row, response_field)).strip(), True),
    ]


def alpaca(row: dict) -> Segments:
    return instruction_with_context(row, "input", "output")


def dolly(row: dict) -> Segments:
    return instruction_with_context(row, "context", "response")


def samsum(row: dict) -> Segments:
    dialogue = normalize(text_field(row, "dialogue")).strip()
    return [
        (SAMSUM_PROMPT.format(dialogue=dialogue), False),
        (normalize(text_field(row, "summary")).strip(), True),
    ]


def template_fields(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def make_template(template: str, response_field: str) -> Callable[[dict], Segments]:
    fields = template_fields(template)

    def render(row: dict) -> Segments:
        values = {name: normalize(text_field(row, name)) for name in fields}
        return [
            (template.format(**values), False),
            (normalize(text_field(row, response_field)).strip(), True),
        ]

    return render


# an assistant message's reasoning, by the names chat templates read it: `thinking` (gpt-oss's
# harmony renders it as the analysis channel of the last assistant turn), `reasoning_content`
# (Qwen3's template)
REASONING = ("thinking", "reasoning_content")
NOT_INCREMENTAL = (
    "the chat template does not render conversations incrementally (an assistant turn renders "
    "differently once later turns follow it, as gpt-oss's harmony ends the last one with "
    "<|return|> and earlier ones with <|end|>): give each assistant turn a row of its own, the "
    "conversation up to it"
)


def make_chat(tokenizer) -> Callable[[dict], Segments]:
    """Render `messages` with the tokenizer's chat template; every assistant turn is trainable,
    with its reasoning (`thinking` or `reasoning_content`) where the template renders it.

    The template is rendered for growing prefixes of the conversation; each assistant turn's
    text is what its render adds after the generation prompt. Templates whose renders are not
    prefixes of each other are rejected rather than guessed at.
    """

    def render(messages: list, add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat(row: dict) -> Segments:
        if "messages" not in row:
            raise RowError("missing field 'messages'", "missing_field:messages")
        messages = row["messages"]
        if messages is None:
            raise RowError("field 'messages' is null", "null_field:messages")
        if not isinstance(messages, list) or not messages:
            raise RowError(
                "field 'messages' must be a non-empty list of {role, content}", "bad_type:messages"
            )
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise RowError(f"messages[{i}] must be an object", "bad_type:messages")
            role = text_field(message, "role")
            if role not in ("system", "user", "assistant"):
                raise RowError(
                    f"messages[{i}].role must be system, user or assistant, got {role!r}",
                    "bad_role",
                )
            turn = {"role": role, "content": normalize(text_field(message, "content"))}
            for key in REASONING:  # an assistant turn's reasoning, for templates that render it
                if role == "assistant" and message.get(key) is not None:
                    turn[key] = normalize(text_field(message, key))
            clean.append(turn)
        if not any(m["role"] == "assistant" for m in clean):
            raise RowError("no assistant message to learn from", "no_assistant_turn")
        segments: Segments = []
        done = ""
        for i, message in enumerate(clean):
            if message["role"] == "assistant":
                prompt = render(clean[:i], add_generation_prompt=True)
                if not prompt.startswith(done):
                    raise RowError(NOT_INCREMENTAL, "chat_template")
                segments.append((prompt[len(done) :], False))
                done = prompt
            full = render(clean[: i + 1])
            if not full.startswith(done):
                raise RowError(NOT_INCREMENTAL, "chat_template")
            segments.append((full[len(done) :], message["role"] == "assistant"))
            done = full
        return [s for s in segments if s[0]]

    return chat


def formatter(data_cfg, tokenizer) -> tuple[Callable[[dict], Segments], tuple[str, ...]]:
    """The record → segments function of `data.format`, and the fields a table must have."""
    if data_cfg.format == "template":
        render = make_template(data_cfg.template, data_cfg.response_field)
        return render, template_fields(data_cfg.template) + (data_cfg.response_field,)
    if data_cfg.format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            from ..errors import UserError

            raise UserError("data.format=chat: the tokenizer of the model has no chat template")
        return make_chat(tokenizer), REQUIRED["chat"]
    return {"alpaca": alpaca, "dolly": dolly, "samsum": samsum}[data_cfg.format], REQUIRED[
        data_cfg.format
    ]
