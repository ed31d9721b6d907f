"""data.format=preference: records of a prompt with a chosen and a rejected answer → two token
documents per pair, prompt + chosen answer + EOS then prompt + rejected answer + EOS, spilled
one after the other (the pair stays whole through the split and packing: step.py).

Record layouts (each record may use any of them):
- `prompt`, `chosen`, `rejected` as text: used as they are (no template), the tokenizer's BOS
  before the prompt;
- `prompt` as chat messages (or text, read as one user turn) with `chosen`/`rejected` as the
  assistant's answer (text, one message or a list of messages): rendered with the tokenizer's
  chat template, the answer being what the conversation's render adds after the prompt's
  render with the generation prompt;
- `chosen`/`rejected` as whole conversations (UltraFeedback-binarized's message lists; a
  `prompt` text beside them is the first user turn again and is not read): the messages they
  share are the prompt, the rest each one's answer;
- `chosen`/`rejected` as whole dialogues in text without `prompt` (Anthropic HH's
  "\\n\\nHuman: ... \\n\\nAssistant: ..."): the prompt is the text both share up to and
  including its last "\\n\\nAssistant:", the rest each one's answer.

The prompt is tokenized once per pair. Lengths: a prompt over `data.max_prompt_len` tokens
keeps its last ones (the turn the answers reply to; a BOS the tokenizer adds stays first);
then a document over `data.max_seq_len` loses its answer's tail (truncate; the EOS too) or
its pair is dropped (drop). Bad records (a missing field, an empty answer, the same chosen
and rejected answer, a shared prompt that cannot be found) are `RowError`s: the file:line
errors of every format."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..artifacts import IGNORE_INDEX
from .encode import Encoded, Encoder, special_prefix
from .formats import NOT_INCREMENTAL, REASONING, RowError, normalize, text_field
from .ragged import Rows, offsets_of
from .readers import LineBatch
from .spill import SpillBatch

REQUIRED = ("chosen", "rejected")
HH_TURN = "\n\nAssistant:"


def _messages(value, field: str) -> list[dict]:
    """Chat messages of `field`: a list of {role, content} (one message object is a list of
    one)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(f"field {field!r} must be text or a list of messages", f"bad_type:{field}")
    clean = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{field}[{i}] must be an object", f"bad_type:{field}")
        role = text_field(message, "role")
        if role not in ("system", "user", "assistant"):
            raise RowError(
                f"{field}[{i}].role must be system, user or assistant, got {role!r}", "bad_role"
            )
        turn = {"role": role, "content": normalize(text_field(message, "content"))}
        for key in REASONING:
            if role == "assistant" and message.get(key) is not None:
                turn[key] = normalize(text_field(message, key))
        clean.append(turn)
    return clean


def _field(row: dict, name: str):
    if name not in row:
        raise RowError(f"missing field {name!r}", f"missing_field:{name}")
    if row[name] is None:
        raise RowError(f"field {name!r} is null", f"null_field:{name}")
    return row[name]


def _shared_prompt(chosen: str, rejected: str) -> str:
    """HH: the text both dialogues share, up to and including its last assistant turn's tag."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    end = chosen.rfind(HH_TURN, 0, n)  # the last tag inside the shared text
    if end < 0:
        raise RowError(
            "no prompt: `chosen` and `rejected` share no text up to an "
            f"{HH_TURN.strip()!r} turn (give a `prompt` field)",
            "no_shared_prompt",
        )
    return chosen[: end + len(HH_TURN)]


class PreferenceRenderer:
    """A record → (prompt text, chosen answer text, rejected answer text, chat?)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RowError(
                "chat messages need the tokenizer's chat template, and the model's tokenizer "
                "has none",
                "chat_template",
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def answer(self, prompt: list[dict], answer: list[dict], prompt_text: str, field: str) -> str:
        if any(m["role"] != "assistant" for m in answer):
            raise RowError(
                f"{field}: the answer after the shared prompt must be assistant messages",
                "bad_role",
            )
        full = self.render(prompt + answer)
        if not full.startswith(prompt_text):
            raise RowError(NOT_INCREMENTAL, "chat_template")
        return full[len(prompt_text) :]

    def __call__(self, row: dict) -> tuple[str, str, str, bool]:
        chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
        prompt = row.get("prompt")
        texts = isinstance(chosen, str) and isinstance(rejected, str)
        if texts and (prompt is None or isinstance(prompt, str)):
            if prompt is None:  # HH: whole dialogues
                chosen, rejected = normalize(chosen), normalize(rejected)
                head = _shared_prompt(chosen, rejected)
                return head, chosen[len(head) :], rejected[len(head) :], False
            return (
                normalize(text_field(row, "prompt")),
                normalize(chosen),
                normalize(rejected),
                False,
            )
        if (
            isinstance(chosen, list)
            and isinstance(rejected, list)
            and not (isinstance(prompt, list))
        ):  # whole conversations (UltraFeedback-binarized): the shared messages are the prompt
            c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            if n == 0 or c[n - 1]["role"] == "assistant":
                raise RowError(
                    "no prompt: `chosen` and `rejected` must share their messages up to the "
                    "last user turn",
                    "no_shared_prompt",
                )
            shared = c[:n]
            prompt_text = self.render(shared, add_generation_prompt=True)
            if n == len(c) or n == len(r):
                which = "chosen" if n == len(c) else "rejected"
                raise RowError(f"empty {which} answer", f"empty_answer:{which}")
            return (
                prompt_text,
                self.answer(shared, c[n:], prompt_text, "chosen"),
                self.answer(shared, r[n:], prompt_text, "rejected"),
                True,
            )
        if prompt is None:
            raise RowError("missing field 'prompt'", "missing_field:prompt")
        shared = (
            [{"role": "user", "content": normalize(text_field(row, "prompt"))}]
            if isinstance(prompt, str)
            else _messages(prompt, "prompt")
        )
        prompt_text = self.render(shared, add_generation_prompt=True)
        answers = []
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            turns = (
                [{"role": "assistant", "content": normalize(value)}]
                if isinstance(value, str)
                else _messages(value, name)
            )
            answers.append(self.answer(shared, turns, prompt_text, name))
        return prompt_text, answers[0], answers[1], True


def check_pair(chosen: str, rejected: str) -> None:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowError(f"empty {name} answer", f"empty_answer:{name}")
    if chosen.strip() == rejected.strip():
        raise RowError("`chosen` and `rejected` are the same answer", "identical_answers")


class PreferenceEncoder(Encoder):
    """A batch of `(where, record)` → `Encoded` with two documents per kept pair."""

    def __init__(self, data_cfg, tokenizer):
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.chat = False
        self.prefix = special_prefix(tokenizer)
        self.required = REQUIRED
        self.render = PreferenceRenderer(tokenizer)
        self.max_prompt = data_cfg.max_prompt_len or data_cfg.max_seq_len // 2

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def pairs(self, records, dropped: Counter) -> tuple[list, int, str | None]:
        """(prompt, chosen, rejected, chat) of the usable records (`Encoder.usable`)."""

        def convert(row: dict):
            pair = self.render(row)
            check_pair(pair[1], pair[2])
            return pair

        return self.usable(records, dropped, convert)

    def __call__(self, batch) -> Encoded:
        dropped: Counter = Counter()
        records = batch.records() if isinstance(batch, LineBatch) else batch
        pairs, read, error = self.pairs(records, dropped)
        backend = self.tokenizer.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        texts = [text for p in pairs for text in p[:3]]  # the prompt once per pair
        ids = [e.ids for e in encode(texts, add_special_tokens=False)] if texts else []
        cfg, eos = self.data_cfg, self.tokenizer.eos_token_id
        docs_ids: list[np.ndarray] = []
        docs_labels: list[np.ndarray] = []
        prompts: list[str] = []
        answers: list[str] = []
        truncated = kept_tokens = trained = 0
        for k, (prompt_text, chosen, rejected, chat) in enumerate(pairs):
            prefix = [] if chat else self.prefix
            prompt = ids[3 * k]
            room = self.max_prompt - len(prefix)
            cut_prompt = len(prompt) > room
            if cut_prompt:  # keep the prompt's end, next to the answers
                prompt = prompt[len(prompt) - room :] if room > 0 else []
            head = np.asarray(prefix + prompt, dtype=np.int32)
            pair_docs = []
            too_long = False
            for answer in (ids[3 * k + 1], ids[3 * k + 2]):
                tail = np.asarray(answer + [eos], dtype=np.int32)
                doc = np.concatenate([head, tail])
                labels = np.concatenate([np.full(len(head), IGNORE_INDEX, np.int32), tail])
                if len(doc) > cfg.max_seq_len:
                    too_long = True
                    doc, labels = doc[: cfg.max_seq_len], labels[: cfg.max_seq_len]
                pair_docs.append((doc, labels))
            if too_long and cfg.overlength == "drop":
                dropped["too_long"] += 1
                continue
            if any(not (lab != IGNORE_INDEX).any() for _, lab in pair_docs):
                dropped["no_response_after_truncation"] += 1
                continue
            truncated += int(too_long or cut_prompt)
            for (doc, labels), answer_text in zip(pair_docs, (chosen, rejected), strict=True):
                docs_ids.append(doc)
                docs_labels.append(labels)
                prompts.append(prompt_text)
                answers.append(answer_text)
                kept_tokens += len(doc)
                trained += int((labels != IGNORE_INDEX).sum())
        lengths = np.fromiter(map(len, docs_ids), np.int64, len(docs_ids))
        empty: np.ndarray = np.zeros(0, np.int32)
        rows = Rows(
            np.concatenate(docs_ids) if docs_ids else empty,
            np.concatenate(docs_labels) if docs_labels else empty,
            offsets_of(lengths),
        )
        return Encoded(
            SpillBatch.of(rows, prompts, answers),
            kept_tokens,
            trained,
            read,
            dropped,
            truncated,
            error,
        )


def pair_lengths(lengths: np.ndarray) -> np.ndarray:
    """Tokens of each pair (its two documents) from the documents' lengths."""
    return lengths[0::2] + lengths[1::2]


def documents(pairs: np.ndarray) -> np.ndarray:
    """The document indices of `pairs`, each pair's chosen then rejected."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
