"""`tiny://ARCH`: a few-MB model of a real architecture, built here, with no download.

The config comes from the architecture's own transformers config class (scaled down), the
weights from a counter-based generator (numpy PCG64 seeded by the parameter's name, so they do
not depend on torch's RNG or on transformers' init code), and the tokenizer is a byte-level BPE
trained with `tokenizers` on the corpus shipped in `components/data/corpus.txt`. The result is
saved with `save_pretrained` into a cache folder and loaded back through `from_pretrained`,
exactly like a real checkpoint. The same call gives the same weight and tokenizer bytes on
every machine, so a later step can rebuild the very base a run trained on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .architectures import TINY_BUILDERS
from .errors import UserError

SCHEME = "tiny://"
TINY_SPEC_VERSION = 1  # bump when a config, the init rule or the tokenizer recipe changes
VOCAB_SIZE = 1024
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# tiny://NAME -> its config builder, from the family records (components/architectures/):
# 2 layers, hidden 64, 4 heads, each in its family's real layout.
ARCHITECTURES: dict[str, Callable] = TINY_BUILDERS


def is_tiny(name_or_path: str) -> bool:
    return name_or_path.startswith(SCHEME)


def tiny_arch(name_or_path: str) -> str:
    arch = name_or_path[len(SCHEME) :].strip("/")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"model.name_or_path: unknown tiny architecture {arch!r}; "
            f"known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def tiny_model_dir(name_or_path: str) -> Path:
    """Build `tiny://ARCH` once per cache (atomically) and return its folder."""
    arch = tiny_arch(name_or_path)
    key = hashlib.sha256(CORPUS.read_bytes()).hexdigest()[:12]
    target = cache_root() / "tiny" / f"{arch}-v{TINY_SPEC_VERSION}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=target.parent))
    try:
        build_tiny_model(arch, staging)
        try:
            staging.rename(target)
        except OSError:  # another process (a second torchrun worker) won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train_tiny_tokenizer():
    """A byte-level BPE trained on the shipped corpus, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = CORPUS.read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def deterministic_init(model, arch: str) -> None:
    """Fill every parameter from PCG64 seeded by (arch, parameter name): same bytes everywhere."""
    import torch

    for name, param in model.named_parameters():
        if param.ndim == 1:
            value = np.ones if name.endswith("weight") else np.zeros
            data = value(param.shape, dtype=np.float32)
        else:
            seed = int.from_bytes(hashlib.sha256(f"{arch}:{name}".encode()).digest()[:8], "little")
            uniform = np.random.Generator(np.random.PCG64(seed)).random(param.shape)
            data = ((uniform * 2.0 - 1.0) * (0.02 * 3**0.5)).astype(np.float32)  # std 0.02
        with torch.no_grad():
            param.copy_(torch.from_numpy(data))


def build_tiny_model(arch: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids([EOS, PAD])
    config = ARCHITECTURES[arch](
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2048,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    deterministic_init(model, arch)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
