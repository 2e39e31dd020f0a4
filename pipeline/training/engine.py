"""The training engine: one step per variant and one epoch (scoring is pipeline.training.inference). Plain torch only.

It runs in one process or under torchrun (DDP; gloo on CPU, NCCL on GPU) and never asks whether
Ray is around: stages wrap it from outside. A step returns detached tensors and never waits for
the device; the epoch loop reads numbers only when it logs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.profiler import record_function

from model.deeplab import DeepLabV3Plus
from model.losses import (
    confident_fraction,
    feature_aggregation_loss,
    loss_coefficients,
    mix_in_box,
    ohem_loss,
    pseudo_label_loss,
    pseudo_labels,
    reconstruction_loss,
    supervised_loss,
    total_loss,
)
from model.masking import (
    IGNORE,
    apply_patch_mask,
    class_isolated_inputs,
    patch_mask,
    plain_masked_inputs,
    sample_classes,
)
from pipeline.config.schema import Config
from pipeline.training.inference import Inference

LOSS_METRICS = ("loss", "loss_x", "loss_s", "loss_fp", "loss_cmim", "loss_fa", "loss_smim")


def build_model(config: Config, num_classes: int, *, reconstruction: bool | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ from the config; the reconstruction head exists only where CMIM uses it."""
    from pipeline.training.standin import resolved_init

    m = config.model
    if reconstruction is None:
        reconstruction = "cmim" in config.terms()
    return DeepLabV3Plus(
        num_classes,
        backbone=m.backbone,
        init=resolved_init(m),
        width=m.width,
        aspp_channels=m.aspp_channels,
        decoder_channels=m.decoder_channels,
        low_level_channels=m.low_level_channels,
        dilations=m.dilations,
        fp_dropout=m.fp_dropout,
        reconstruction=reconstruction,
        reconstruct_from=config.mim.head,
    )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights; a reconstruction head missing on either side is fine (warmup has none)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing + unexpected if not k.startswith("reconstruction_head.")]
    if bad:
        raise RuntimeError(f"checkpoint does not fit the model: {', '.join(bad[:5])}")


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - min(step, total) / max(total, 1)) ** power


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def move(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Engine:
    """A model, its optimiser, its teacher and the training step of one variant."""

    def __init__(
        self,
        model: DeepLabV3Plus,
        config: Config,
        num_classes: int,
        device: torch.device,
        *,
        variant: str,
        total_steps: int,
        lr: float | None = None,
    ):
        self.config, self.num_classes, self.device = config, num_classes, device
        self.variant, self.total_steps = variant, total_steps
        self.terms = config.terms(variant)
        optim = config.optim
        self.memory_format = torch.channels_last if optim.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=self.memory_format)
        if is_distributed() and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model  # the plain module: checkpoints and evaluation use it
        self.inference = Inference(model, num_classes, device, amp=optim.amp, channels_last=optim.channels_last)
        self.net = (
            DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
            )
            if is_distributed()
            else model
        )
        lr = lr or optim.lr
        self.optimizer = torch.optim.SGD(
            [
                {"params": list(model.backbone.parameters()), "lr": lr, "base_lr": lr},
                {"params": model.head_parameters(), "lr": lr * optim.head_lr_mult, "base_lr": lr * optim.head_lr_mult},
            ],
            lr=lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=optim.amp == "fp16")
        self.ema = None
        if variant != "supervised" and config.unimatch.teacher == "ema":
            self.ema = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(config.unimatch.ema_decay), use_buffers=True
            )
        self.step = 0
        self._last_grad_norm = -(10**9)  # the step gradient norms were last measured at

    def uses(self, term: str) -> bool:
        return term in self.terms

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]

    # -- training ------------------------------------------------------------------------------

    def autocast(self):
        return self.inference.autocast()

    def _set_lr(self) -> float:
        power = self.config.optim.poly_power
        # UniMatch sets the lr after each step from the iterations done before it, so step k uses the
        # decay of step k - 1 (steps 0 and 1 both use the base lr).
        done = max(self.step - 1, 0)
        for group in self.optimizer.param_groups:
            group["lr"] = poly_lr(group["base_lr"], done, self.total_steps, power)
        return self.optimizer.param_groups[0]["lr"]

    def train_step(
        self, labeled: dict, unlabeled: dict | None = None, partner: dict | None = None, *, diagnose: bool = False
    ) -> dict:
        """One optimisation step. Returns detached scalar tensors named as in SPEC §5 (no ``train/``).

        ``diagnose`` adds ``grad_norm/<term>``: each loss term's share of the gradient (its coefficient in
        the total included) on the encoder, the parameters every term trains, and ``grad_norm/total``. It
        costs one extra backward pass per term and leaves the step itself unchanged.
        """
        self.net.train()
        lr = self._set_lr()
        labeled = move(labeled, self.device, self.config.optim.channels_last)
        with self.autocast():
            if self.variant == "supervised":
                terms, extra = {"x": self._supervised(self.net(labeled["image"]).logits, labeled["label"])}, {}
            else:
                unlabeled = move(unlabeled, self.device, self.config.optim.channels_last)
                partner = move(partner, self.device, self.config.optim.channels_last) if partner else None
                terms, extra = self._semi_terms(labeled, unlabeled, partner)
            weights = {"cmim": self.config.mim.weight, "fa": self.config.fa.weight, "smim": self.config.smim.weight}
            loss = total_loss(terms, weights)
        if diagnose:
            extra = extra | self._grad_norms(terms, loss_coefficients(terms, weights))
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("s4mim.backward"):
            self.scaler.scale(loss).backward()
        if diagnose:
            grads = [p.grad for p in self.model.backbone.parameters() if p.grad is not None]
            extra["grad_norm/total"] = _norm(grads) / (self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        with record_function("s4mim.optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.step += 1
        metrics = {"loss": loss.detach(), "loss_x": terms["x"].detach(), "lr": torch.tensor(lr)}
        if "s1" in terms:
            metrics["loss_s"] = (terms["s1"].detach() + terms.get("s2", terms.get("smim")).detach()) / 2
        for name in ("fp", "cmim", "fa", "smim"):
            if name in terms:
                metrics[f"loss_{name}"] = terms[name].detach()
        return metrics | extra

    def _grad_norms(self, terms: dict, coefficients: dict[str, float]) -> dict[str, torch.Tensor]:
        """The norm of each weighted term's gradient on the encoder parameters (diagnostics)."""
        shared = [p for p in self.model.backbone.parameters() if p.requires_grad]
        out = {}
        with record_function("s4mim.grad_norms"):
            for name, coefficient in coefficients.items():
                grads = torch.autograd.grad(coefficient * terms[name], shared, retain_graph=True, allow_unused=True)
                out[f"grad_norm/{name}"] = _norm([g for g in grads if g is not None])
        return out

    def _supervised(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_x: cross-entropy, or OHEM where the config asks for it."""
        loss = self.config.loss
        if loss.supervised == "ohem":
            return ohem_loss(logits, labels, loss.ohem_threshold, loss.ohem_min_kept)
        return supervised_loss(logits, labels)

    @torch.no_grad()
    def _predict_eval(self, images: torch.Tensor) -> torch.Tensor:
        """A no-grad prediction in eval mode (BatchNorm running statistics), by the teacher."""
        net = self.ema.module if self.ema is not None else self.net
        net.eval()
        logits = net(images).logits
        self.net.train()
        return logits

    def _semi_terms(self, labeled: dict, unlabeled: dict, partner: dict | None) -> tuple[dict, dict]:
        cfg = self.config
        tau = cfg.unimatch.threshold
        x, y = labeled["image"], labeled["label"]
        u_w, pad_u = unlabeled["weak"], unlabeled["padding"]
        n_l = x.shape[0]

        if cfg.unimatch.cutmix_source == "batch":
            with record_function("s4mim.partner_forward"):
                label_p, conf_p = pseudo_labels(self._predict_eval(partner["weak"]))
            s1_p, s2_p, pad_p = partner["strong1"], partner["strong2"], partner["padding"]

        use_fp = self.uses("fp")
        with record_function("s4mim.weak_forward"):
            out = self.net(torch.cat([x, u_w]), perturb_from=n_l if use_fp else None)
        logits_x, logits_w = out.logits[:n_l], out.logits[n_l:]
        teacher_w = self._predict_eval(u_w) if self.ema is not None else logits_w
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
            if cfg.smim.view == "s2":
                strong[1] = apply_patch_mask(s2, smim_mask)
            else:
                strong.append(apply_patch_mask(s1, smim_mask))
        with record_function("s4mim.strong_forward"):
            logits_s = self.net(torch.cat(strong)).logits.chunk(len(strong))

        terms = {
            "x": self._supervised(logits_x, y),
            "s1": pseudo_label_loss(logits_s[0], *target1, tau),
            "s2": pseudo_label_loss(logits_s[1], *target2, tau),
        }
        if use_fp:
            terms["fp"] = pseudo_label_loss(out.logits_fp, label_w, conf_w, pad_u, tau)
        if self.uses("smim"):
            if cfg.smim.view == "extra":
                terms["smim"] = pseudo_label_loss(logits_s[2], *target1, tau)
            elif cfg.smim.count == "add":
                terms["smim"] = terms["s2"]  # the masked second view counts in L_base and as L_smim
            else:
                terms["smim"] = terms.pop("s2")  # ... or once, as L_smim in place of L_s2
        if self.uses("cmim") or self.uses("fa"):
            terms |= self._mim_terms(labeled, u_w, label_w, conf_w, pad_u)
        extra = {"mask_ratio": confident_fraction(conf_w, pad_u, tau)}
        if "truth" in unlabeled:  # diagnostics only: the true masks never reach a loss
            extra |= pseudo_label_accuracy(label_w, conf_w, unlabeled["truth"], pad_u, tau)
        return terms, extra

    def _mim_terms(self, labeled, u_w, label_w, conf_w, pad_u) -> dict:
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
        with frozen_bn_stats(self.model, cfg.freeze_bn_stats), record_function("s4mim.masked_forward"):
            decoder_fa = self.uses("fa") and self.config.fa.feature == "decoder"
            out = self.net(inputs, need_features=decoder_fa, need_reconstruction=self.uses("cmim"), need_logits=False)
        terms = {}
        if self.uses("cmim"):
            terms["cmim"] = reconstruction_loss(out.reconstruction, images, scored, cfg.loss)
        if self.uses("fa"):
            features = out.features if self.config.fa.feature == "decoder" else out.encoder_features
            terms["fa"] = feature_aggregation_loss(features, fa_batch, self.config.fa.stop_grad)
        return terms

    def train_epoch(
        self,
        batches: Iterable[tuple[dict, dict | None, dict | None]],
        steps: int,
        *,
        on_log: Callable[[dict, int], None] | None = None,
        log_every: int = 10,
        grad_norm_every: int = 0,
    ) -> dict[str, float]:
        """Run ``steps`` steps over ``batches``; returns the epoch's mean metrics and ``img_per_s``.

        ``on_log(metrics, step)`` gets running means every ``log_every`` steps (numbers, prefixed
        ``train/``); this is the only place the loop waits for the device. With ``grad_norm_every`` the
        first logged step at least that many steps after the last measurement also measures each term's
        gradient norm (``train/grad_norm/<term>``, that step's).
        """
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        count = window_count = images = 0
        start = window_start = time.perf_counter()
        for i, (labeled, unlabeled, partner) in enumerate(batches):
            if i >= steps:
                break
            logs_now = on_log is not None and (window_count + 1 == log_every or i == steps - 1)
            diagnose = logs_now and grad_norm_every > 0 and self.step + 1 - self._last_grad_norm >= grad_norm_every
            if diagnose:
                self._last_grad_norm = self.step + 1
            metrics = self.train_step(labeled, unlabeled, partner, diagnose=diagnose)
            snapshot = {k: metrics.pop(k) for k in [k for k in metrics if k.startswith("grad_norm/")]}
            n_images = labeled["image"].shape[0] + (unlabeled["weak"].shape[0] if unlabeled else 0)
            images += n_images
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            count += 1
            window_count += 1
            if logs_now:
                elapsed = time.perf_counter() - window_start
                logged = {f"train/{k}": float(v) / window_count for k, v in window.items()}
                logged |= {f"train/{k}": float(v) for k, v in snapshot.items()}
                logged["train/img_per_s"] = window_count * n_images * self._world() / max(elapsed, 1e-9)
                on_log(logged, self.step)
                window, window_count, window_start = {}, 0, time.perf_counter()
        elapsed = time.perf_counter() - start
        means = {f"train/{k}": float(v) / max(count, 1) for k, v in sums.items()}
        means["train/img_per_s"] = images * self._world() / max(elapsed, 1e-9)
        return means

    @staticmethod
    def _world() -> int:
        return dist.get_world_size() if is_distributed() else 1


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a list of tensors taken as one vector."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors]))


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
