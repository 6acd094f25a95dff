"""Sweeps inside one run: the hyperparameter grid of each method (lr x plus_sft_weight x label
type) and the CE label types a method trains with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ia2dist.config.sections import LABEL_METHODS, TrainConfig
from ia2dist.errors import IA2Error


def label_types_for(train_cfg: TrainConfig, method: str) -> tuple[str, ...]:
    """The CE label types ``method`` trains with: its train.label_types entry, else
    (train.label_type,); () for methods without a CE target on labels (ia2, soft_sft)."""
    if method not in LABEL_METHODS:
        return ()
    chosen = train_cfg.label_types.get(method)
    if not chosen:
        return (train_cfg.label_type,)
    return tuple(dict.fromkeys([chosen] if isinstance(chosen, str) else chosen))


def label_type_for(train_cfg: TrainConfig, method: str) -> str | None:
    """The one label type of ``method`` (None without a CE target); IA2Error when its entry in
    train.label_types lists several (a sweep: use ``expand_grid``, whose points carry one each)."""
    kinds = label_types_for(train_cfg, method)
    if len(kinds) > 1:
        raise IA2Error(f"train.label_types.{method}: {list(kinds)} is a sweep over label types; "
                       "train each point of expand_grid(train, method)")
    return kinds[0] if kinds else None


def as_list(value) -> list:
    """A sweepable field's values: its list, or its one scalar as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass(frozen=True)
class GridPoint:
    """One hyperparameter setting of a method in a sweep.

    train: the train config with scalar lr / plus_sft_weight and, for methods with a CE target,
    label_type set to this point's (label_types emptied), ready for the trainer.
    params: what varies, {"lr": ..., "plus_sft_weight": ... (ia2_plus_sft only), "label_type": ...
    (methods with a CE target only)} - the keys to tag result rows with.
    tag: a short name of the point for folder and row names, e.g. "lr0.0001_w0.02_icl".
    """

    method: str
    train: TrainConfig
    params: dict
    tag: str


def _number_tag(value: float) -> str:
    return f"{value:g}"


def expand_grid(train_cfg: TrainConfig, method: str) -> list[GridPoint]:
    """Every hyperparameter setting ``method`` is trained with: lr x plus_sft_weight (ia2_plus_sft
    only) x label type (methods with a CE target only), in config order (lr outermost). Settings a
    method does not use are not expanded for it, as the reference's sweep does (its tna sweeps
    the weight, tok and a2t the label type)."""
    weights = as_list(train_cfg.plus_sft_weight) if method == "ia2_plus_sft" else [None]
    kinds = list(label_types_for(train_cfg, method)) or [None]
    points = []
    for lr in as_list(train_cfg.lr):
        for weight in weights:
            for kind in kinds:
                params = {"lr": float(lr)}
                changes = {"lr": float(lr), "label_types": {}}
                tag = [f"lr{_number_tag(lr)}"]
                if weight is not None:
                    params["plus_sft_weight"] = changes["plus_sft_weight"] = float(weight)
                    tag.append(f"w{_number_tag(weight)}")
                else:
                    changes["plus_sft_weight"] = float(as_list(train_cfg.plus_sft_weight)[0])
                if kind is not None:
                    params["label_type"] = changes["label_type"] = kind
                    tag.append("gt" if kind == "ground_truth" else kind)
                points.append(GridPoint(method, dataclasses.replace(train_cfg, **changes), params,
                                        "_".join(tag)))
    return points


def is_sweep(train_cfg: TrainConfig) -> bool:
    """True when some method of train.methods has more than one grid point."""
    return any(len(expand_grid(train_cfg, m)) > 1 for m in train_cfg.methods)
