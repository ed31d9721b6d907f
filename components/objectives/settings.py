"""The recipe's `preference` section: the parameters of the preference objectives
(preference.py), validated on load like every other section."""

from __future__ import annotations

from pydantic import Field

from ..config_sections import Section


class PreferenceConfig(Section):
    """train.objective=dpo/ipo/simpo/orpo: the preference loss's parameters
    (components/objectives/preference.py)."""

    beta: float | None = Field(
        None,
        gt=0,
        description="dpo, ipo, simpo: how far the policy may move from the reference (dpo: "
        "the reward scale; ipo: the regularization tau; simpo: the reward scale of mean "
        "log-probabilities). Default 0.1 (simpo: 2.0).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="dpo, simpo: the share of pairs assumed flipped (conservative DPO): the "
        "loss is (1 - e) x -log sigmoid(x) + e x -log sigmoid(-x).",
    )
    gamma: float | None = Field(
        None,
        ge=0.0,
        description="simpo: the target reward margin gamma. Default 0.5.",
    )
    orpo_lambda: float | None = Field(
        None,
        gt=0,
        description="orpo: the weight lambda of the odds-ratio term beside the chosen answer's "
        "next-token loss. Default 0.1.",
    )
