"""The preference objectives against TRL (pinned in the test dependencies): on the same tiny
model with the same LoRA weights and the same pairs (prepared by `kubetune prepare`, packed and
unpacked), kubetune's loss and every LoRA gradient equal TRL's in fp32 — DPOTrainer for dpo
(sigmoid) and ipo, the CPO trainer (loss_type=simpo, cpo_alpha=0) for simpo and the ORPO
trainer for orpo, both under trl.experimental in trl 1.16."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import load_from_disk

from kubetune.components.config import load_recipe
from kubetune.components.objectives import objective_of
from kubetune.components.train.kernels import use_token_logps
from kubetune.components.train.reference import Reference

from .conftest import REPO, run_cli

trl = pytest.importorskip("trl")

RECIPE = REPO / "pipelines" / "recipes" / "tiny-dpo.yaml"
CPU = torch.device("cpu")
PAIRS = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The first pairs of the sample preference set, prepared packed and unpacked."""
    out = {}
    for packing in (True, False):
        folder = tmp_path_factory.mktemp("pairs") / "data"
        result = run_cli(
            "prepare", RECIPE, "--output", folder, "--set", f"data.packing={str(packing).lower()}",
            "--set", f"data.max_rows={PAIRS + 2}", "--set", "data.eval_fraction=0.2",
        )  # fmt: skip
        assert result.code == 0, result
        out[packing] = [dict(r) for r in load_from_disk(str(folder))["train"]]
    return out


def split_pairs(rows: list[dict]) -> list[dict]:
    """TRL's prompt_ids / chosen_ids / rejected_ids of each pair in kubetune's rows."""
    pairs, docs = [], []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            docs.append((row["input_ids"][a:b], row["labels"][a:b]))
    for (c_ids, c_lab), (r_ids, r_lab) in zip(docs[0::2], docs[1::2], strict=True):
        n = next(i for i, label in enumerate(c_lab) if label != -100)
        assert c_ids[:n] == r_ids[:n] and next(i for i, v in enumerate(r_lab) if v != -100) == n
        pairs.append({"prompt_ids": c_ids[:n], "chosen_ids": c_ids[n:], "rejected_ids": r_ids[n:]})
    return pairs


def lora_model(seed: int = 0):
    """The tiny Falcon in fp32 with LoRA on its attention and MLP, B drawn at random (the
    policy then differs from the reference, so every term of the loss is live)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.components.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model("tiny://falcon"), dtype=torch.float32, attn_implementation="eager"
    )
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    torch.manual_seed(seed)  # A's Kaiming draw
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    model.config.use_cache = False
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def kubetune_loss(objective, rows: list[dict]):
    from kubetune.components.methods import REGISTRY as METHODS

    model = lora_model()
    use_token_logps(model.get_base_model(), chunked=True)
    model.train()
    batch = objective.collate(rows, 0, "eager", torch.float32)
    reference = Reference(model, lambda: METHODS["lora"].reference(model))
    out = objective.loss(model, batch, CPU, "eager", reference)
    out.value.backward()
    return out, lora_grads(model)


def trl_args(cls, tmp_path, **kwargs):
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    return cls(**common, **kwargs)


def padded(pairs: list[dict], which: str) -> dict:
    """CPO/ORPO's batch keys for one side: input ids, attention mask and labels (prompt -100),
    right-padded."""
    ids = [p["prompt_ids"] + p[f"{which}_ids"] for p in pairs]
    labels = [[-100] * len(p["prompt_ids"]) + p[f"{which}_ids"] for p in pairs]
    width = max(map(len, ids))
    return {
        f"{which}_input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
        f"{which}_attention_mask": torch.tensor(
            [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        ),
        f"{which}_labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def trl_loss(name: str, pairs: list[dict], tmp_path, settings):
    from datasets import Dataset

    from kubetune.components.models import load_tokenizer

    cfg = load_recipe(RECIPE)
    tokenizer = load_tokenizer(cfg.model)
    text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    model = lora_model()
    model.train()
    warnings.simplefilter("ignore")
    if name in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        loss_type = {"dpo": "sigmoid", "ipo": "ipo"}[name]
        args = trl_args(DPOConfig, tmp_path, beta=settings.beta, loss_type=[loss_type])
        trainer = DPOTrainer(model=model, args=args, train_dataset=text, processing_class=tokenizer)
        # A PeftModel passed in is "an adapter trained before": TRL copies it as a "ref" adapter.
        # Without it TRL's reference is the base with the adapters disabled, as for a new
        # adapter (whose B is zero); ours is that too, and B is random here on purpose.
        if "ref" in trainer.model.peft_config:
            trainer.model.delete_adapter("ref")
            trainer.model.set_adapter("default")
        inputs = DataCollatorForPreference(pad_token_id=0)(pairs)
        loss = trainer._compute_loss(trainer.model, inputs, False)
    else:
        batch = {**padded(pairs, "chosen"), **padded(pairs, "rejected")}
        if name == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            args = trl_args(
                CPOConfig, tmp_path, beta=settings.beta, loss_type="simpo", cpo_alpha=0.0,
                simpo_gamma=settings.gamma, label_smoothing=settings.label_smoothing,
            )  # fmt: skip
            trainer = CPOTrainer(
                model=model, args=args, train_dataset=text, processing_class=tokenizer
            )
        else:
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            args = trl_args(ORPOConfig, tmp_path, beta=settings.orpo_lambda)
            trainer = ORPOTrainer(
                model=model, args=args, train_dataset=text, processing_class=tokenizer
            )
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    return loss, lora_grads(trainer.model)


CASES = [
    ("dpo", []),
    ("ipo", ["preference.beta=0.5"]),
    ("simpo", ["preference.beta=2.0", "preference.gamma=0.3", "preference.label_smoothing=0.1"]),
    ("orpo", ["preference.orpo_lambda=0.2"]),
]


@pytest.mark.integration
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize(("name", "sets"), CASES, ids=[name for name, _ in CASES])
def test_loss_and_lora_gradients_equal_trl(prepared, packing, name, sets, tmp_path):
    overrides = [f"train.objective={name}"] + sets
    if name == "orpo":
        overrides.append("preference.beta=null")
    cfg = load_recipe(RECIPE, overrides)
    objective = objective_of(cfg)
    rows = prepared[packing]
    pairs = split_pairs(rows)
    assert len(pairs) >= PAIRS - 1
    ours, our_grads = kubetune_loss(objective, rows)
    theirs, their_grads = trl_loss(name, pairs, tmp_path, objective.settings)
    assert float(ours.value) == pytest.approx(float(theirs), abs=1e-5, rel=1e-5)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 10
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.integration
def test_the_answer_log_probabilities_never_hold_the_full_logits(prepared, monkeypatch):
    """A dpo step (the reference's forward, the policy's forward and backward) computes
    vocabulary-wide values only for answer positions, a chunk of rows at a time: no tensor
    with a vocabulary dimension holds more than one chunk's rows (here 16; the worker sizes
    chunks by bytes), never the batch x length x vocabulary logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kubetune.components.methods import REGISTRY as METHODS
    from kubetune.components.train import kernels

    monkeypatch.setattr(kernels, "chunk_rows", lambda rows, hidden, vocab: 16)
    objective = objective_of(load_recipe(RECIPE))
    batch = objective.collate(prepared[True], 0, "eager", torch.float32)
    model = lora_model()
    use_token_logps(model.get_base_model(), chunked=True)
    config = model.get_base_model().config
    vocab, head = config.vocab_size, (config.hidden_size, config.vocab_size)

    class VocabWide(TorchDispatchMode):
        rows = 0  # the most rows of any tensor with a vocabulary-sized last dimension

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                wide = isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab
                if wide and tuple(t.shape) != head:  # (the head's weight, transposed)
                    self.rows = max(self.rows, t.numel() // vocab)
            return out

    reference = Reference(model, lambda: METHODS["lora"].reference(model))
    with VocabWide() as seen:
        objective.loss(model, batch, CPU, "eager", reference).value.backward()
    tokens = batch["input_ids"].numel()
    assert int(batch["answer_len"].sum()) < tokens / 2  # the prompts are most of the tokens
    assert 0 < seen.rows <= 16 < tokens, (seen.rows, tokens)
