"""A stage's cache key: its config, its inputs' hash and the fingerprint of its code.

The key names the stage's folder (``runs/stages/<preset>/<stage>-<key>``) and its Ray run; the parts
are written beside it (``hash.json``), so that a cache miss can say which part changed.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.fingerprint import code_fingerprint, file_digest


def stage_hash(config, stage: str, inputs: str = "") -> str:
    """Hash of everything that changes a stage's output: its config, its inputs' hash and its code."""
    blob = json.dumps(stage_hash_parts(config, stage, inputs), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_hash_parts(config, stage: str, inputs: str = "") -> dict[str, str]:
    """What ``stage_hash`` covers, part by part, so that a cache miss can say which part changed."""
    parts = {
        "seed": config.seed,
        "data": config.data.model_dump(exclude={"loader_workers"}),
        "model": config.model.model_dump(),
        "optim": config.optim.model_dump(exclude={"channels_last"}),
        "loss": config.loss.model_dump(),
        "workers": config.scaling.workers,
    }
    if stage in ("warmup", "train"):  # eval.* decides which epoch's checkpoint counts as the stage's best
        parts["eval"] = config.eval.model_dump(exclude={"grid_images"})
    if stage == "warmup":
        parts["warmup"] = config.warmup.model_dump()
    if stage in ("train", "evaluate"):
        parts |= {
            "variant": config.variant,
            "warmup": config.warmup.model_dump(),
            "train": config.train.model_dump(),
            **{name: _method_section(config, name) for name in method_sections(config)},
        }
    if stage == "evaluate":
        parts["eval"] = config.eval.model_dump()
    if config.model.init == "standin":  # the weights it names change when the stand-in is rebuilt
        from pipeline.training.standin import resolve

        parts["standin"] = file_digest(resolve(config.model.backbone, config.model.width))
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return {"config": digest, "inputs": inputs, "code": code_fingerprint(stage)}


def _method_section(config, name: str) -> dict:
    """A method section as the run reads it: a knob that only another mode reads is hashed at its
    default, so that setting it leaves the key alone (plain MIM never reads ``mim.input``)."""
    section = getattr(config, name)
    values = section.model_dump()
    if name == "mim" and section.mode != "classwise":
        values["input"] = type(section).model_fields["input"].default
    return values


def method_sections(config) -> tuple[str, ...]:
    """The method's config sections that the run's loss terms read (``Config.terms``).

    A knob of a term the run does not train leaves its key alone: a supervised run reads none of
    unimatch, mim, fa and smim, a UniMatch run only unimatch, and an S4MIM run fa and smim only when
    their terms are on. So an ablation that changes an SMIM knob retrains the runs that train SMIM,
    not its baselines. mim is read by every masked term: CMIM and FA share its masked forward, and
    SMIM falls back to its patch and ratio."""
    if config.variant == "supervised":
        return ()
    terms = config.terms()
    sections = ["unimatch"]
    if terms & {"cmim", "fa", "smim"}:
        sections.append("mim")
    sections += [name for name in ("fa", "smim") if name in terms]
    return tuple(sections)
