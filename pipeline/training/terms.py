"""The loss terms of one training step (SPEC §3): L_x, UniMatch's L_s1, L_s2 and L_fp, and S4MIM's
L_cmim, L_fa and L_smim. Plain torch only.

``StepTerms`` turns a step's batches into a dict of loss tensors, named as ``model.losses.total_loss``
reads them, plus the diagnostics that ride along (``mask_ratio``, ``pseudo_acc``). It owns no
parameters and no optimiser: the engine hands it the network to run and the teacher to ask, and
weighs and back-propagates what it returns.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.profiler import record_function

from model.losses import (
    confident_fraction,
    feature_aggregation_loss,
    mix_in_box,
    ohem_loss,
    pseudo_label_loss,
    pseudo_labels,
    reconstruction_loss,
    supervised_loss,
)
from model.masking import (
    IGNORE,
    apply_patch_mask,
    class_isolated_inputs,
    patch_mask,
    plain_masked_inputs,
    sample_classes,
    unscored_pixels,
)
from pipeline.config.schema import Config


@contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True):
    """Normalise with batch statistics but leave the running statistics untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


class StepTerms:
    """The loss terms a variant trains with (``config.terms(variant)``), computed from one step's batches.

    Each method takes ``net``, the network being trained (wrapped for DDP where distributed), and the
    semi-supervised ones ``teacher``, the module that predicts the pseudo labels: the EMA teacher's
    module, or ``None`` when the student labels its own weak view.
    """

    def __init__(self, config: Config, num_classes: int, terms: frozenset[str], memory_format: torch.memory_format):
        self.config, self.num_classes, self.terms, self.memory_format = config, num_classes, terms, memory_format

    def uses(self, term: str) -> bool:
        return term in self.terms

    def supervised(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_x: cross-entropy, or OHEM where the config asks for it."""
        loss = self.config.loss
        if loss.supervised == "ohem":
            return ohem_loss(logits, labels, loss.ohem_threshold, loss.ohem_min_kept)
        return supervised_loss(logits, labels)

    def semi(
        self, net: nn.Module, teacher: nn.Module | None, labeled: dict, unlabeled: dict, partner: dict | None
    ) -> tuple[dict, dict]:
        """UniMatch's terms on labeled, unlabeled and CutMix partner batches, plus S4MIM's where configured.

        Returns the loss terms and the diagnostics (``mask_ratio``; ``pseudo_acc`` where the unlabeled
        batch carries its true masks, which reach no loss)."""
        cfg = self.config
        tau = cfg.unimatch.threshold
        x, y = labeled["image"], labeled["label"]
        u_w, pad_u = unlabeled["weak"], unlabeled["padding"]
        n_l = x.shape[0]

        if cfg.unimatch.cutmix_source == "batch":
            with record_function("s4mim.partner_forward"):
                label_p, conf_p = pseudo_labels(_predict_eval(net, teacher, partner["weak"]))
            s1_p, s2_p, pad_p = partner["strong1"], partner["strong2"], partner["padding"]

        use_fp = self.uses("fp")
        with record_function("s4mim.weak_forward"):
            out = net(torch.cat([x, u_w]), perturb_from=n_l if use_fp else None)
        logits_x, logits_w = out.logits.split([n_l, u_w.shape[0]])  # split's backward is one cat, not two zero-fills
        teacher_w = _predict_eval(net, teacher, u_w) if teacher is not None else logits_w
        label_w, conf_w = pseudo_labels(teacher_w)

        s1, s2 = unlabeled["strong1"], unlabeled["strong2"]
        if cfg.unimatch.cutmix_source == "roll":
            label_p, conf_p = label_w.roll(1, 0), conf_w.roll(1, 0)
            s1_p, s2_p, pad_p = s1.roll(1, 0), s2.roll(1, 0), pad_u.roll(1, 0)
        box1, box2 = unlabeled["box1"], unlabeled["box2"]
        s1, s2 = mix_in_box(s1, s1_p, box1), mix_in_box(s2, s2_p, box2)
        target1 = [mix_in_box(a, b, box1) for a, b in ((label_w, label_p), (conf_w, conf_p), (pad_u, pad_p))]
        target2 = [mix_in_box(a, b, box2) for a, b in ((label_w, label_p), (conf_w, conf_p), (pad_u, pad_p))]

        strong = [s1, s2]
        if self.uses("smim"):
            smim_mask = patch_mask(
                s1.shape[0],
                *s1.shape[-2:],
                cfg.smim.patch or cfg.mim.patch,
                cfg.smim.ratio or cfg.mim.ratio,
                device=s1.device,
            )
            # The masked view, and the pseudo labels it is scored against (in the same pixel coordinates).
            if cfg.smim.view == "s2":
                strong[1] = apply_patch_mask(s2, smim_mask)
                smim_target = target2
            elif cfg.smim.view == "extra":
                strong.append(apply_patch_mask(s1, smim_mask))
                smim_target = target1
            else:  # weak: the weak view masked, against the pseudo labels of the whole weak view
                strong.append(apply_patch_mask(u_w, smim_mask))
                smim_target = [label_w, conf_w, pad_u]
        with record_function("s4mim.strong_forward"):
            logits_s = net(torch.cat(strong)).logits.chunk(len(strong))

        terms = {
            "x": self.supervised(logits_x, y),
            "s1": pseudo_label_loss(logits_s[0], *target1, tau),
            "s2": pseudo_label_loss(logits_s[1], *target2, tau),
        }
        if use_fp:
            terms["fp"] = pseudo_label_loss(out.logits_fp, label_w, conf_w, pad_u, tau)
        if self.uses("smim"):
            pseudo, confidence, padding = smim_target
            if cfg.smim.view == "s2" and cfg.smim.pixels == "all":
                smim = terms["s2"]  # the masked second view's L_s2 is L_smim
            else:
                logits = logits_s[1] if cfg.smim.view == "s2" else logits_s[2]
                padding = unscored_pixels(padding, smim_mask, cfg.smim.pixels)
                smim = pseudo_label_loss(logits, pseudo, confidence, padding, tau)
            if cfg.smim.view == "s2" and cfg.smim.count == "replace":
                del terms["s2"]  # the masked second view counts once, as L_smim in place of L_s2
            terms["smim"] = smim  # with count=add, L_s2 also counts in L_base
        if self.uses("cmim") or self.uses("fa"):
            terms |= self.masked(net, labeled, u_w, label_w, conf_w, pad_u)
        extra = {"mask_ratio": confident_fraction(conf_w, pad_u, tau)}
        if "truth" in unlabeled:  # diagnostics only: the true masks never reach a loss
            extra |= pseudo_label_accuracy(label_w, conf_w, unlabeled["truth"], pad_u, tau)
        return terms, extra

    def masked(self, net: nn.Module, labeled: dict, u_w, label_w, conf_w, pad_u) -> dict:
        """L_cmim and L_fa: one masked forward, over class-isolated inputs or over whole images.

        The class maps are the labels of the labeled images and the confident pseudo labels of the
        unlabeled ones. Which row of the masked forward each (image, class) pair reads is the
        ``MaskedInputs``' business (``forward_row``), not this method's."""
        cfg = self.config.mim
        conf = cfg.conf if cfg.conf is not None else self.config.unimatch.threshold
        images, class_maps, paddings = [], [], []
        if cfg.on in ("labeled", "both"):
            images.append(labeled["image"])
            class_maps.append(labeled["label"])
            paddings.append(labeled["padding"])
        if cfg.on in ("unlabeled", "both"):
            images.append(u_w)
            class_maps.append(torch.where((conf_w >= conf) & ~pad_u, label_w, IGNORE))
            paddings.append(pad_u)
        images, class_map, padding = torch.cat(images), torch.cat(class_maps), torch.cat(paddings)
        n, _, h, w = images.shape
        with record_function("s4mim.masked_inputs"):
            masked = patch_mask(n, h, w, cfg.patch, cfg.ratio, device=images.device)
            class_ids, valid = sample_classes(class_map, self.num_classes, cfg.max_classes, cfg.min_pixels)
            if cfg.mode == "classwise" and cfg.input == "isolated":  # a forward per (image, class) pair
                batch = fa_batch = scored = class_isolated_inputs(images, class_map, masked, class_ids, valid)
            else:  # a forward per image; the pairs point into it
                batch, fa_batch = plain_masked_inputs(images, masked, padding, class_map, class_ids, valid)
                scored = fa_batch if cfg.mode == "classwise" else batch
            inputs = batch.inputs.contiguous(memory_format=self.memory_format)
        with frozen_bn_stats(net, cfg.freeze_bn_stats), record_function("s4mim.masked_forward"):
            decoder_fa = self.uses("fa") and self.config.fa.feature == "decoder"
            out = net(inputs, need_features=decoder_fa, need_reconstruction=self.uses("cmim"), need_logits=False)
        terms = {}
        if self.uses("cmim"):
            terms["cmim"] = reconstruction_loss(out.reconstruction, images, scored, cfg.loss)
        if self.uses("fa"):
            features = out.features if self.config.fa.feature == "decoder" else out.encoder_features
            terms["fa"] = feature_aggregation_loss(features, fa_batch, self.config.fa.stop_grad)
        return terms


@torch.no_grad()
def _predict_eval(net: nn.Module, teacher: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
    """A no-grad prediction in eval mode (BatchNorm running statistics), by the teacher where there is one."""
    model = teacher if teacher is not None else net
    model.eval()
    logits = model(images).logits
    net.train()
    return logits


def pseudo_label_accuracy(
    pseudo: torch.Tensor, confidence: torch.Tensor, truth: torch.Tensor, padding: torch.Tensor, threshold: float
) -> dict[str, torch.Tensor]:
    """How often the weak view's pseudo labels (B, H, W) match the true masks, on the pixels the masks label:
    ``pseudo_acc`` over all of them, ``pseudo_acc_confident`` over those that pass the threshold."""
    known = (truth != IGNORE) & ~padding
    hit = (pseudo == truth) & known
    confident = known & (confidence >= threshold)
    return {
        "pseudo_acc": hit.sum() / known.sum().clamp_min(1),
        "pseudo_acc_confident": (hit & confident).sum() / confident.sum().clamp_min(1),
    }
