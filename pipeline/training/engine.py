"""The training engine: the state of one run and its step and epoch loops. Plain torch only.

It runs in one process or under torchrun (DDP; gloo on CPU, NCCL on GPU) and never asks whether
Ray is around: stages wrap it from outside. What the engine composes lives beside it: the set-up
around the model (``pipeline.training.optimization``), the loss terms of a step
(``pipeline.training.terms``) and scoring (``pipeline.training.inference``). A step returns
detached tensors and never waits for the device; the epoch loop reads numbers only when it logs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.profiler import record_function

from model.deeplab import DeepLabV3Plus
from model.losses import loss_coefficients, total_loss
from pipeline.config.schema import Config
from pipeline.training.inference import Inference
from pipeline.training.optimization import (
    ema_teacher,
    for_device,
    loss_scaler,
    set_poly_lr,
    sgd,
    world_size,
)
from pipeline.training.terms import StepTerms

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


def move(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


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
        self.model, self.net = for_device(model, device, self.memory_format)  # plain (checkpoints), and run
        self.inference = Inference(self.model, num_classes, device, amp=optim.amp, channels_last=optim.channels_last)
        self.optimizer = sgd(self.model, config, lr or optim.lr)
        self.scaler = loss_scaler(config, device)
        self.ema = ema_teacher(self.model, config, variant)
        self.losses = StepTerms(config, num_classes, self.terms, self.memory_format)
        self.step = 0
        self._last_grad_norm = -(10**9)  # the step gradient norms were last measured at

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "last_grad_norm": self._last_grad_norm,  # a resumed run measures gradient norms where a straight one would
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self._last_grad_norm = state.get("last_grad_norm", self._last_grad_norm)

    # -- training ------------------------------------------------------------------------------

    def autocast(self):
        return self.inference.autocast()

    def _set_lr(self) -> float:
        return set_poly_lr(self.optimizer, self.step, self.total_steps, self.config.optim.poly_power)

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
                terms, extra = {"x": self.losses.supervised(self.net(labeled["image"]).logits, labeled["label"])}, {}
            else:
                unlabeled = move(unlabeled, self.device, self.config.optim.channels_last)
                partner = move(partner, self.device, self.config.optim.channels_last) if partner else None
                teacher = self.ema.module if self.ema is not None else None
                terms, extra = self.losses.semi(self.net, teacher, labeled, unlabeled, partner)
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
                logged["train/img_per_s"] = window_count * n_images * world_size() / max(elapsed, 1e-9)
                on_log(logged, self.step)
                window, window_count, window_start = {}, 0, time.perf_counter()
        elapsed = time.perf_counter() - start
        means = {f"train/{k}": float(v) / max(count, 1) for k, v in sums.items()}
        means["train/img_per_s"] = images * world_size() / max(elapsed, 1e-9)
        return means


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a list of tensors taken as one vector."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors]))
