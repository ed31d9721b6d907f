"""A model's fast tokenizer for `prepare`, loaded with `tokenizers` alone: no transformers, so
no torch (importing them costs a few seconds of every prepare run, on every pod).

Only what prepare needs: the Rust tokenizer (`backend_tokenizer`), the special tokens (EOS, and
pad as `load_tokenizer` sets it), what a text on its own gets in front (`__call__`), the
vocabulary size, and the chat template, rendered by transformers' own jinja2 renderer (its
chat-template module imports no torch), so `data.format: chat` gives the same text.

It is used only for the tokenizers transformers itself loads as a plain fast tokenizer: a
`tokenizer.json` whose `tokenizer_config.json` names `PreTrainedTokenizerFast` or
`TokenizersBackend`, for a model type whose transformers tokenizer class does not rewrite it
(PLAIN_MODEL_TYPES; tests/test_fast_tokenizer.py checks ids, special tokens and the
fingerprint against transformers). Anything else, `load_prepare_tokenizer` loads with
transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Model types whose transformers tokenizer is the plain fast tokenizer of tokenizer.json
# (checked against transformers for each tiny:// architecture of that type).
PLAIN_MODEL_TYPES = ("falcon", "llama", "mistral")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")


def _token(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken's dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    def __init__(self, backend, config: dict, chat_template: str | None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        tokens = {key: _token(config.get(key)) for key in SPECIAL_KEYS}
        if tokens["pad_token"] is None:  # as load_tokenizer: EOS pads when the model has no pad
            tokens["pad_token"] = tokens["eos_token"]
        self.special_tokens_map: dict[str, Any] = {k: v for k, v in tokens.items() if v}
        extra = [_token(t) for t in config.get("additional_special_tokens") or []]
        if extra:
            self.special_tokens_map["additional_special_tokens"] = extra
        self.eos_token = tokens["eos_token"]
        self.pad_token = tokens["pad_token"]
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.pad_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        encoding = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": encoding.ids}

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(
        self, messages: list, tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        assert not tokenize, "prepare tokenizes the rendered segments itself"
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )
        return rendered[0]

    @classmethod
    def load(cls, folder: Path) -> FastTokenizer | None:
        """The folder's tokenizer, or None when transformers must load it."""
        files = {name: folder / name for name in ("tokenizer.json", "tokenizer_config.json")}
        if not all(path.is_file() for path in files.values()):
            return None
        try:
            config = json.loads(files["tokenizer_config.json"].read_text(encoding="utf-8"))
            model = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if config.get("tokenizer_class") not in PLAIN_CLASSES:
            return None
        if model.get("model_type") not in PLAIN_MODEL_TYPES:
            return None
        template = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        if not isinstance(template, str | None):  # named templates: transformers picks one
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(files["tokenizer.json"]))
        except Exception:  # a tokenizer.json this tokenizers cannot read: transformers decides
            return None
        return cls(backend, config, template)
