"""The objective seam (components/objectives/): `train.objective: sft` is the next-token loss
transformers computes, and the training and evaluation loops take the batch, the loss and the
logged metrics from the objective, whatever it is."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kubetune.components.artifacts import IGNORE_INDEX
from kubetune.components.backends.local import free_port
from kubetune.components.config import dump_config, load_recipe
from kubetune.components.errors import UserError
from kubetune.components.objectives import REGISTRY, Loss, Objective, objective_of
from kubetune.components.train.data import collate
from kubetune.components.train.parallel import World
from kubetune.components.train.progress import LossLog

from .conftest import TINY_DEMO

CPU = torch.device("cpu")
SFT = REGISTRY["sft"]


@pytest.fixture
def one_rank():
    """A process group of this process alone (gloo), as the loops' collectives need."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield World(0, 0, 1, CPU)
    dist.destroy_process_group()


def rows() -> list[dict]:
    """Two packed rows: prompt tokens masked (-100), a second example where positions restart."""
    first = {"input_ids": [5, 6, 7, 8, 9, 10], "position_ids": [0, 1, 2, 0, 1, 2]}
    first["labels"] = [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, 10]
    second = {
        "input_ids": [11, 12, 13],
        "labels": [IGNORE_INDEX, 12, 13],
        "position_ids": [0, 1, 2],
    }
    return [first, second]


def test_sft_is_transformers_next_token_loss():
    """sft's batch is train/data.py's collate and its loss what the model's own forward
    computes from those inputs; the eval weight is the count of labelled next tokens."""
    from transformers import AutoModelForCausalLM

    from kubetune.components.models import resolve_model

    cfg = load_recipe(TINY_DEMO, ["model.name_or_path=tiny://llama"])
    sft = objective_of(cfg)
    assert sft is REGISTRY["sft"] and cfg.train.objective == "sft"
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny://llama"), dtype=torch.float32)
    batch = sft.collate(rows(), 0, "sdpa", torch.float32)
    reference = collate(rows(), 0, "sdpa", torch.float32)
    assert batch.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(torch.as_tensor(batch[key]), torch.as_tensor(value)), key
    out = sft.loss(model, batch, CPU, "sdpa")
    inputs = {k: reference[k] for k in ("input_ids", "labels", "position_ids", "attention_mask")}
    torch.testing.assert_close(out.value, model(**inputs).loss)
    assert out.metrics == {}
    labelled = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows())
    assert sft.weight(batch) == labelled == 6  # the tokens a next-token loss predicts


def test_train_objective_takes_the_registered_names_and_dumps_as_before():
    cfg = load_recipe(TINY_DEMO)
    assert "objective" not in dump_config(cfg)  # recipes and compiled pipelines are unchanged
    with pytest.raises(UserError, match="train.objective must be one of 'sft', 'dpo', 'ipo', "):
        load_recipe(TINY_DEMO, ["train.objective=kto"])
    with pytest.raises(UserError, match="train.objective=dpo trains on pairs: it needs data.fo"):
        load_recipe(TINY_DEMO, ["train.objective=dpo"])


class Halved(Objective):
    """A stand-in objective: half of sft's loss, with a metric of its own."""

    name = "halved"
    columns = SFT.columns
    metrics = ("doubled",)

    def collate(self, rows, pad_id, attn, dtype, pad_to=0):
        return SFT.collate(rows, pad_id, attn, dtype, pad_to)

    def loss(self, model, batch, device, attn, reference=None):
        value = SFT.loss(model, batch, device, attn).value / 2
        return Loss(value, {"doubled": value.detach() * 4})

    def weight(self, batch):
        return 1


def test_the_eval_loop_takes_its_loss_from_the_objective(one_rank, monkeypatch):
    """evaluate() weights and averages what the objective says: swapping the objective
    changes the result accordingly (the loop names no loss itself)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from kubetune.components.models import resolve_model
    from kubetune.components.train.loop import evaluate

    cfg = load_recipe(TINY_DEMO, ["model.name_or_path=tiny://llama", "train.micro_batch_size=1"])
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny://llama"), dtype=torch.float32)
    split = Dataset.from_list(rows())
    sft, metrics = evaluate(cfg, model, split, one_rank, 0, "sdpa", torch.float32)
    assert metrics == {}
    with torch.no_grad():
        single = [
            float(SFT.loss(model, collate([row], 0, "sdpa", torch.float32), CPU, "sdpa").value)
            for row in rows()
        ]
    assert sft == pytest.approx((single[0] * 4 + single[1] * 2) / 6)  # token-weighted
    monkeypatch.setitem(REGISTRY, "sft", Halved())
    halved, metrics = evaluate(cfg, model, split, one_rank, 0, "sdpa", torch.float32)
    assert halved == pytest.approx(sum(single) / 2 / 2)  # each batch weighs 1
    # its metric, weighted as its loss: the mean of 4 x each batch's halved loss
    assert metrics == {"doubled": pytest.approx(sum(single) / 2 * 4 / 2)}


def test_the_objectives_metrics_are_logged_beside_the_loss(one_rank):
    """LossLog carries the objective's metrics through the same collective as the loss, into
    TensorBoard as train/NAME; a step without them is refused."""
    written = []

    class Writer:
        def add_scalar(self, tag, value, step):
            written.append((tag, round(value, 6), step))

    losses: list = []
    log = LossLog(one_rank, losses, Writer(), ("doubled",))
    log.add(1, torch.tensor(0.5), 1e-3, 10, {"doubled": torch.tensor(2.0)})
    log.add(2, torch.tensor(0.25), 1e-3, 10, {"doubled": torch.tensor(1.0)})
    landed = log.flush()
    assert losses == [[1, 0.5], [2, 0.25]] and [s for s, _, _ in landed] == [1, 2]
    assert log.metrics == {"doubled": [[1, 2.0], [2, 1.0]]}
    assert ("train/doubled", 2.0, 1) in written and ("train/loss", 0.25, 2) in written
    with pytest.raises(ValueError, match="expected \\['doubled'\\]"):
        log.add(3, torch.tensor(0.1), 1e-3, 10)


def test_a_moe_models_load_balancing_loss_is_transformers_and_joins_the_sft_loss():
    """tiny://qwen3-moe (4 experts, top-2) in training: the router watch's load-balancing loss
    over the real tokens equals transformers' own (its load_balancing_loss_func with the 2-D
    padding mask), sft adds it times router_aux_loss_coef and reports it with the experts'
    load; in evaluation the loss is the next-token loss alone."""
    from transformers import AutoModelForCausalLM

    from kubetune.components.models import resolve_model
    from kubetune.components.train.moe import install

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model("tiny://qwen3-moe"), dtype=torch.float32
    )
    watch = install(model)
    assert watch is not None and (watch.experts, watch.top_k) == (4, 2)
    assert SFT.metrics_for(model) == ("router_aux_loss", "expert_load_max", "expert_load_min")
    unpacked = [dict(r, position_ids=list(range(len(r["input_ids"])))) for r in rows()]
    batch = SFT.collate(unpacked, 0, "sdpa", torch.float32)  # one row padded: 6 + 3 tokens
    assert batch["lengths"] == [6, 3]
    model.train()
    torch.manual_seed(0)
    out = SFT.loss(model, batch, CPU, "sdpa")
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    torch.manual_seed(0)
    reference = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        labels=batch["labels"],
        output_router_logits=True,
    )
    torch.testing.assert_close(out.metrics["router_aux_loss"], reference.aux_loss)
    lm_loss = reference.loss - model.config.router_aux_loss_coef * reference.aux_loss
    torch.testing.assert_close(out.value, lm_loss + watch.coef * out.metrics["router_aux_loss"])
    picks = out.metrics["expert_load_max"], out.metrics["expert_load_min"]
    assert picks[0] >= 1.0 >= picks[1] >= 0.0  # relative to an even share of the 9 x 2 x 2 picks
    model.eval()
    assert SFT.loss(model, batch, CPU, "sdpa").metrics == {}
    assert (
        SFT.metrics_for(AutoModelForCausalLM.from_pretrained(resolve_model("tiny://qwen3"))) == ()
    )
