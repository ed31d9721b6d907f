"""prepare's tokenizer without transformers (components/fast_tokenizer.py) against the one
transformers loads: same ids, special tokens, fingerprint and chat text; the same prepared
dataset, byte for byte; and the architectures it must leave to transformers."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kubetune.components.config import load_recipe
from kubetune.components.data_model_match import tokenizer_fingerprint
from kubetune.components.fast_tokenizer import FastTokenizer
from kubetune.components.models import load_prepare_tokenizer, load_tokenizer, resolve_model
from kubetune.components.prepare_dataset import step
from kubetune.components.prepare_dataset.encode import special_prefix

from .conftest import TINY_DEMO, write_jsonl

TEXTS = ["", "Hello world", "  two  spaces\r\nand a line", "émigré – naïve ✓", "<|endoftext|>x"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.mark.parametrize("arch", ["falcon", "falcon-40b", "llama", "mistral"])
def test_fast_tokenizer_matches_transformers(arch):
    folder = Path(resolve_model(f"tiny://{arch}"))
    ours = FastTokenizer.load(folder)
    assert ours is not None
    theirs = AutoTokenizer.from_pretrained(folder)
    if theirs.pad_token_id is None:
        theirs.pad_token = theirs.eos_token
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (
        theirs.eos_token_id,
        theirs.pad_token_id,
        len(theirs),
    )
    assert ours.special_tokens_map == {k: str(v) for k, v in theirs.special_tokens_map.items()}
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(theirs)
    assert special_prefix(ours) == special_prefix(theirs)
    for add in (True, False):
        assert [ours(t, add_special_tokens=add)["input_ids"] for t in TEXTS] == [
            theirs(t, add_special_tokens=add)["input_ids"] for t in TEXTS
        ]
    for prompt in (True, False):
        assert ours.apply_chat_template(CHAT, add_generation_prompt=prompt) == (
            theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        )


def test_architectures_transformers_rewrites_are_left_to_it():
    """transformers loads tiny://qwen2's tokenizer as Qwen2Tokenizer: not ours to load."""
    folder = Path(resolve_model("tiny://qwen2"))
    assert type(AutoTokenizer.from_pretrained(folder)).__name__ == "Qwen2Tokenizer"
    assert FastTokenizer.load(folder) is None
    cfg = load_recipe(TINY_DEMO, ["model.name_or_path=tiny://qwen2"])
    assert type(load_prepare_tokenizer(cfg.model)).__name__ == "Qwen2Tokenizer"


@pytest.mark.integration  # prepare runs end to end, twice
@pytest.mark.parametrize("data_format", ["samsum", "chat"])
def test_prepare_output_is_byte_identical_to_transformers_tokenizer(
    tmp_path, monkeypatch, data_format
):
    """The whole prepared dataset (shards, stats with the tokenizer fingerprint, state) with
    our tokenizer and with transformers' (load_tokenizer patched in)."""
    rows = (
        [
            {"dialogue": f"A: hi {i}\r\nB: hello there", "summary": f"They greet {i}."}
            for i in range(40)
        ]
        if data_format == "samsum"
        else [
            {"messages": [*CHAT[:2], {"role": "assistant", "content": f"{i}"}]} for i in range(40)
        ]
    )
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = load_recipe(TINY_DEMO, [f"data.path={data}", f"data.format={data_format}"])
    step.prepare(cfg, tmp_path / "ours")
    monkeypatch.setattr(step, "load_prepare_tokenizer", load_tokenizer)
    step.prepare(cfg, tmp_path / "theirs")

    def digests(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    assert digests(tmp_path / "ours") == digests(tmp_path / "theirs")


@pytest.mark.integration  # the prepare step end to end
def test_kubetune_prepare_never_imports_torch_or_transformers(tmp_path):
    import json
    import subprocess

    script = (
        "import json, sys\n"
        "from kubetune.pipelines.cli import main\n"
        f"code = main(['prepare', {str(TINY_DEMO)!r}, '--output', {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps([code, 'torch' in sys.modules, 'transformers' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, False, False]
