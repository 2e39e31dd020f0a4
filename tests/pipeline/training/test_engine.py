"""The engine: a step per variant, and resume that reproduces an uninterrupted run."""

import io

import pytest
import torch

from pipeline.training.engine import Engine, build_model, rng_state, set_rng_state
from pipeline.training.optimization import poly_lr

SPEC_TRAIN_METRICS = {"loss", "loss_x", "loss_s", "loss_fp", "loss_cmim", "loss_fa", "loss_smim", "mask_ratio", "lr"}


def _batches(n, seed=0, b=2, size=32, classes=9):
    from pipeline.commands.bench import random_batches

    return random_batches(n, b, size, classes, torch.device("cpu"), seed)


def _engine(config, variant, seed=0, total=10):
    torch.manual_seed(seed)
    model = build_model(config, 9, reconstruction="cmim" in config.terms(variant))
    return Engine(model, config, 9, torch.device("cpu"), variant=variant, total_steps=total)


@pytest.mark.parametrize("variant", ["supervised", "unimatch", "s4mim"])
def test_step_reports_spec_metric_names(tiny_config, variant):
    config = tiny_config("unimatch.threshold=0.0")  # every pseudo label counts on random data
    engine = _engine(config, variant)
    labeled, unlabeled, partner = _batches(1)[0]
    metrics = engine.train_step(labeled, unlabeled, partner)
    expected = {
        "supervised": {"loss", "loss_x", "lr"},
        "unimatch": {"loss", "loss_x", "loss_s", "loss_fp", "mask_ratio", "lr"},
        "s4mim": SPEC_TRAIN_METRICS,
    }[variant]
    assert set(metrics) == expected
    assert all(torch.isfinite(v) for v in metrics.values())
    if variant == "s4mim":
        assert metrics["loss_cmim"] > 0
        assert 0 < metrics["loss_fa"] < 2  # 1 - cos of features that a random model does not align, nor oppose
    assert engine.step == 1


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["unimatch.teacher=ema", "unimatch.cutmix_source=roll", "smim.view=extra", "mim.mode=plain"],
        ["mim.on=unlabeled", "fa.feature=encoder", "unimatch.feature_perturbation=false", "mim.input=whole"],
    ],
)
def test_each_term_switches_off(tiny_config, extra):
    for off, term in (("mim.weight=0", "loss_cmim"), ("fa.weight=0", "loss_fa"), ("smim.weight=0", "loss_smim")):
        config = tiny_config(*extra, off)
        engine = _engine(config, "s4mim")
        metrics = engine.train_step(*_batches(1)[0])
        assert term not in metrics and torch.isfinite(metrics["loss"])


def _clone(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_resume_after_n_steps_matches_uninterrupted_run(tiny_config):
    """Stop after 3 steps, resume in a fresh engine, and check the next steps match exactly."""
    config = tiny_config("unimatch.teacher=ema", "unimatch.threshold=0.3")
    batches = _batches(6, seed=3)

    straight = _engine(config, "s4mim", total=6)
    torch.manual_seed(123)
    reference = [straight.train_step(*b) for b in batches]

    first = _engine(config, "s4mim", total=6)
    torch.manual_seed(123)
    for b in batches[:3]:
        first.train_step(*b)
    saved = _clone({"engine": first.state_dict(), "rng": rng_state()})
    del first
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = _engine(config, "s4mim", seed=42, total=6)
    resumed.load_state_dict(saved["engine"])
    set_rng_state(saved["rng"])
    after = [resumed.train_step(*b) for b in batches[3:]]

    assert resumed.step == straight.step == 6
    for ref, got in zip(reference[3:], after):
        for key in ref:
            assert torch.equal(ref[key], got[key]), key
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(next(iter(straight.ema.state_dict().values())), next(iter(resumed.ema.state_dict().values())))


def test_poly_lr_and_head_multiplier(tiny_config):
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0
    engine = _engine(tiny_config("optim.lr=0.02"), "supervised")
    used = []
    for batch in _batches(3):
        used.append(engine.train_step(*batch[:1])["lr"].item())
    backbone, head = engine.optimizer.param_groups
    assert head["lr"] == pytest.approx(10 * backbone["lr"])
    # UniMatch's schedule: the lr of step k decays by the k - 1 steps before it, so steps 0 and 1 share the base.
    total = engine.total_steps
    assert used == pytest.approx([0.02, 0.02, poly_lr(0.02, 1, total, 0.9)])


def _params(engine):
    return torch.cat([p.detach().flatten() for p in engine.model.parameters()])


@pytest.mark.parametrize("variant", ["supervised", "unimatch", "s4mim"])
def test_gradient_norms_are_measured_without_changing_the_step(tiny_config, variant):
    config = tiny_config("unimatch.threshold=0.0")
    batch = _batches(1, seed=5)[0]
    plain, diagnosed = _engine(config, variant), _engine(config, variant)
    torch.manual_seed(1)
    a = plain.train_step(*batch)
    torch.manual_seed(1)
    b = diagnosed.train_step(*batch, diagnose=True)
    torch.testing.assert_close(_params(plain), _params(diagnosed), rtol=0, atol=0)
    norms = {k.removeprefix("grad_norm/"): v for k, v in b.items() if k.startswith("grad_norm/")}
    expected = {"supervised": {"x"}, "unimatch": {"x", "s1", "s2", "fp"},
                "s4mim": {"x", "s1", "s2", "fp", "cmim", "fa", "smim"}}[variant]  # fmt: skip
    assert set(norms) == expected | {"total"} and not any(k.startswith("grad_norm/") for k in a)
    assert all(torch.isfinite(v) and v >= 0 for v in norms.values())
    assert norms["x"] > 0 and norms["total"] > 0
    if variant == "supervised":  # one term: its gradient is the whole gradient
        torch.testing.assert_close(norms["x"], norms["total"], rtol=1e-5, atol=1e-7)
    else:  # the terms' gradients add up to the total (triangle inequality)
        assert norms["total"] <= sum(v for k, v in norms.items() if k not in ("total", "smim")) * (1 + 1e-5)


def test_pseudo_label_accuracy_counts_only_labelled_pixels():
    from pipeline.training.terms import pseudo_label_accuracy

    pseudo = torch.tensor([[[1, 2, 3, 4]]])
    truth = torch.tensor([[[1, 2, 0, 255]]])
    confidence = torch.tensor([[[0.99, 0.5, 0.99, 0.99]]])
    padding = torch.tensor([[[False, False, False, False]]])
    acc = pseudo_label_accuracy(pseudo, confidence, truth, padding, 0.9)
    assert acc["pseudo_acc"].item() == pytest.approx(2 / 3)  # 255 is not counted
    assert acc["pseudo_acc_confident"].item() == pytest.approx(1 / 2)  # pixels 0 and 2 pass 0.9
    padding[0, 0, 0] = True
    assert pseudo_label_accuracy(pseudo, confidence, truth, padding, 0.9)["pseudo_acc"].item() == pytest.approx(1 / 2)


def test_true_masks_of_unlabeled_images_never_reach_a_loss(tiny_config):
    config = tiny_config("unimatch.threshold=0.0")
    labeled, unlabeled, partner = _batches(1, seed=2)[0]
    truths = [torch.randint(0, 9, unlabeled["padding"].shape), torch.randint(0, 9, unlabeled["padding"].shape)]
    engines, accuracies = [], []
    for truth in truths:
        engine = _engine(config, "s4mim")
        torch.manual_seed(3)
        metrics = engine.train_step(labeled, {**unlabeled, "truth": truth}, partner)
        engines.append(engine)
        accuracies.append(metrics["pseudo_acc"])
    torch.testing.assert_close(_params(engines[0]), _params(engines[1]), rtol=0, atol=0)
    assert 0 <= accuracies[0] <= 1 and accuracies[0] != accuracies[1]


def test_encoder_head_masked_forward_skips_the_decoder_and_keeps_the_losses(tiny_config, monkeypatch):
    """The masked forward that stops after the encoder gives the losses of a full forward (fp32, 1e-5)."""
    config = tiny_config("unimatch.threshold=0.0", "mim.head=encoder", "fa.feature=encoder")
    batch = _batches(1, seed=4)[0]
    results = []
    for full in (False, True):
        engine = _engine(config, "s4mim")
        decodes = []
        forward, decode = engine.model.forward, engine.model._decode
        monkeypatch.setattr(
            engine.model, "_decode", lambda lo, hi, d=decode, c=decodes: c.append(lo.shape[0]) or d(lo, hi)
        )
        if full:  # also run the decoder on the masked inputs; nothing reads it
            monkeypatch.setattr(
                engine.model, "forward", lambda x, f=forward, **kw: f(x, **{**kw, "need_features": True})
            )
        torch.manual_seed(7)
        metrics = engine.train_step(*batch)
        results.append((metrics, _params(engine), len(decodes)))
    (fast, fast_params, fast_decodes), (slow, slow_params, slow_decodes) = results
    assert slow_decodes == fast_decodes + 1  # the masked forward: decoded only when forced
    for name in ("loss", "loss_x", "loss_s", "loss_fp", "loss_cmim", "loss_fa", "loss_smim"):
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_params, slow_params, rtol=1e-5, atol=1e-5)


def test_smim_replace_counts_the_masked_view_once(tiny_config):
    batch = _batches(1, seed=6)[0]
    losses = {}
    for count, weight in (("add", 0.5), ("replace", 0.125)):
        engine = _engine(tiny_config("unimatch.threshold=0.0", f"smim.count={count}", f"smim.weight={weight}"), "s4mim")
        torch.manual_seed(8)
        losses[count] = engine.train_step(*batch)
    add, replace = losses["add"], losses["replace"]
    torch.testing.assert_close(add["loss_smim"], replace["loss_smim"])  # the same masked view and mask
    # add: L_base (with the masked view as L_s2) + 0.5 L_smim; replace at λ 0.125: L_base alone.
    torch.testing.assert_close(replace["loss"], add["loss"] - 0.5 * add["loss_smim"], rtol=1e-5, atol=1e-6)


def test_smim_replace_needs_the_second_view(tiny_config):
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="smim.count=replace needs smim.view=s2"):
        tiny_config("smim.count=replace", "smim.view=extra")


def _smim_calls(tiny_config, monkeypatch, *extra):
    """One s4mim step with SMIM alone (τ 0): the patch mask SMIM drew, the strong forward's input, and every
    pseudo-label loss's arguments in the order they were computed (s1, s2, fp, then smim where it has its own)."""
    import pipeline.training.terms as terms_module

    engine = _engine(tiny_config("unimatch.threshold=0.0", "mim.weight=0", "fa.weight=0", "smim.patch=8", *extra),
                     "s4mim")  # fmt: skip
    seen = {"calls": []}
    draw, loss, forward = terms_module.patch_mask, terms_module.pseudo_label_loss, engine.model.forward

    def record_mask(*args, **kw):
        seen["mask"] = draw(*args, **kw)
        return seen["mask"]

    def record_loss(logits, pseudo, confidence, padding, threshold):
        seen["calls"].append((logits.detach(), pseudo, confidence, padding))
        return loss(logits, pseudo, confidence, padding, threshold)

    def record_forward(x, **kw):
        seen.setdefault("inputs", []).append(x.detach().clone())
        return forward(x, **kw)

    monkeypatch.setattr(terms_module, "patch_mask", record_mask)
    monkeypatch.setattr(terms_module, "pseudo_label_loss", record_loss)
    monkeypatch.setattr(engine.model, "forward", record_forward)
    torch.manual_seed(4)
    labeled, unlabeled, partner = _batches(1, seed=7)[0]
    seen["metrics"] = engine.train_step(labeled, unlabeled, partner)
    seen["weak"] = unlabeled["weak"]
    return seen


@pytest.mark.parametrize("pixels", ["visible", "masked"])
def test_smim_on_part_of_the_pixels_is_the_mean_over_that_part(tiny_config, monkeypatch, pixels):
    """smim.pixels: L_smim is the masked second view's cross-entropy averaged over its visible (or masked)
    unpadded pixels alone, while L_s2 still scores every pixel of the same view."""
    import torch.nn.functional as F

    seen = _smim_calls(tiny_config, monkeypatch, f"smim.pixels={pixels}")
    s2_logits, s2_pseudo, _, s2_padding = seen["calls"][1]
    logits, pseudo, _, padding = seen["calls"][-1]
    assert torch.equal(logits, s2_logits) and torch.equal(pseudo, s2_pseudo)
    part = ~seen["mask"] if pixels == "visible" else seen["mask"]
    assert torch.equal(padding, s2_padding | ~part)
    ce = F.cross_entropy(s2_logits.float(), s2_pseudo, reduction="none")
    scored = part & ~s2_padding
    torch.testing.assert_close(seen["metrics"]["loss_smim"], (ce * scored).sum() / scored.sum())
    every = ~s2_padding
    s2 = (ce * every).sum() / every.sum()  # τ is 0: every unpadded pixel counts in L_s2
    assert not torch.isclose(seen["metrics"]["loss_smim"], s2)
    s1_logits, s1_pseudo, _, s1_padding = seen["calls"][0]
    s1 = (F.cross_entropy(s1_logits.float(), s1_pseudo, reduction="none") * ~s1_padding).sum() / (~s1_padding).sum()
    torch.testing.assert_close(seen["metrics"]["loss_s"], (s1 + s2) / 2)


def test_smim_masked_consistency_masks_the_weak_view_against_its_own_pseudo_labels(tiny_config, monkeypatch):
    """smim.view=weak (MIC-style): an extra forward of the weak view under SMIM's patch mask, scored against
    the pseudo labels, confidences and padding of the whole weak view, the targets L_fp uses."""
    from model.masking import apply_patch_mask

    seen = _smim_calls(tiny_config, monkeypatch, "smim.view=weak")
    strong = seen["inputs"][-1]  # s1, s2 and the masked weak view, in one forward
    masked_weak = strong.chunk(3)[2]
    torch.testing.assert_close(masked_weak, apply_patch_mask(seen["weak"], seen["mask"]))
    assert seen["mask"].any() and not seen["mask"].all()
    _, fp_pseudo, fp_confidence, fp_padding = seen["calls"][2]
    _, pseudo, confidence, padding = seen["calls"][3]
    assert torch.equal(pseudo, fp_pseudo) and torch.equal(confidence, fp_confidence)
    assert torch.equal(padding, fp_padding)
    assert len(seen["calls"]) == 4 and "loss_smim" in seen["metrics"]


def test_gradient_norms_are_logged_at_their_interval(tiny_config):
    engine = _engine(tiny_config("unimatch.threshold=0.0"), "unimatch", total=12)
    logged = []
    engine.train_epoch(_batches(12, seed=1), 12, on_log=lambda m, step: logged.append((step, m)), log_every=2,
                       grad_norm_every=5)  # fmt: skip
    assert [step for step, _ in logged] == [2, 4, 6, 8, 10, 12]
    measured = [step for step, m in logged if "train/grad_norm/s1" in m]
    assert measured == [2, 8]  # the first logged step, then the first logged step 5 or more steps later
    assert all("train/grad_norm/total" in m for step, m in logged if step in measured)
    assert all(not any(k.startswith("train/grad_norm/") for k in m) for step, m in logged if step not in measured)


def test_cmim_on_the_whole_image_scores_the_plain_forward_per_class(tiny_config, monkeypatch):
    """mim.input=whole: the masked forward sees plain MIM's input; the loss is scored per (image, class) pair."""
    import pipeline.training.terms as terms_module

    batch = _batches(1, seed=5)[0]
    seen = {}
    modes = (("plain", ["mim.mode=plain"]), ("whole", ["mim.input=whole"]), ("isolated", ["mim.input=isolated"]))
    for name, extra in modes:
        engine = _engine(tiny_config("unimatch.threshold=0.0", "fa.weight=0", "smim.weight=0", *extra), "s4mim")
        forward, scored = engine.model.forward, []

        def record(x, f=forward, key=name, **kw):
            out = f(x, **kw)
            if kw.get("need_reconstruction"):
                seen[key] = (x.detach().clone(), out.reconstruction.detach().clone())
            return out

        loss = terms_module.reconstruction_loss
        monkeypatch.setattr(engine.model, "forward", record)
        monkeypatch.setattr(
            terms_module, "reconstruction_loss", lambda r, t, b, k, c=scored, f=loss: c.append((r, b)) or f(r, t, b, k)
        )
        torch.manual_seed(9)
        metrics = engine.train_step(*batch)
        seen[name] += (scored[0], metrics["loss_cmim"])
    plain_x, _, (_, plain_pairs), plain_loss = seen["plain"]
    whole_x, whole_recon, (recon, pairs), whole_loss = seen["whole"]
    isolated_x = seen["isolated"][0]
    assert torch.equal(whole_x, plain_x)  # the same masked whole images, one per image
    assert isolated_x.shape[0] == pairs.valid.shape[0] > whole_x.shape[0]  # isolated: one input per pair
    assert plain_pairs.valid.shape[0] == whole_x.shape[0]  # plain scores one region per image
    # whole: each pair is scored on its image's row of the reconstruction, over one class's masked pixels
    torch.testing.assert_close(recon.detach(), whole_recon)
    assert torch.equal(pairs.forward_row, pairs.image_index)
    assert pairs.valid.any() and not torch.equal(
        pairs.region[pairs.valid], plain_pairs.region[pairs.image_index][pairs.valid]
    )
    assert not torch.isclose(whole_loss, plain_loss)


@pytest.mark.parametrize("mim_input", ["isolated", "whole"])
def test_feature_aggregation_trains_the_row_of_each_pair(tiny_config, monkeypatch, mim_input):
    """In the step itself, with B = 4 and K = 2: FA's gradient reaches the features of each scored pair's own
    input (isolated: one forward row per pair), or of its source image (whole: one row per image), and no
    other row."""
    import pipeline.training.terms as terms_module
    from model.losses import downsample_mask

    config = tiny_config("unimatch.threshold=0.0", "mim.weight=0", "smim.weight=0", "fa.weight=1", "mim.patch=4",
                         "mim.max_classes=2", "fa.feature=decoder", f"mim.input={mim_input}")  # fmt: skip
    engine = _engine(config, "s4mim")
    seen = {}

    def record_fa(features, batch, stop_grad, f=terms_module.feature_aggregation_loss):
        features.retain_grad()
        seen["features"], seen["batch"] = features, batch
        return f(features, batch, stop_grad)

    monkeypatch.setattr(terms_module, "feature_aggregation_loss", record_fa)
    torch.manual_seed(3)
    engine.train_step(*_batches(1, seed=2, b=4, classes=2)[0])  # 2 classes in 8 px blocks: most pairs score
    features, batch = seen["features"], seen["batch"]
    size = features.shape[-2:]
    region, masked = downsample_mask(batch.region, size), downsample_mask(batch.masked, size)
    scored = batch.valid & (region & masked).any(dim=(1, 2)) & (region & ~masked).any(dim=(1, 2))
    pairs = torch.arange(scored.shape[0])
    own_row = pairs if mim_input == "isolated" else batch.image_index
    assert features.shape[0] == (scored.shape[0] if mim_input == "isolated" else 8)  # 4 labeled + 4 unlabeled
    assert own_row[scored].unique().numel() >= 4  # several rows, from several images, for a wrong row to show
    expected = torch.zeros(features.shape[0], dtype=torch.bool)
    expected[own_row[scored]] = True
    got = features.grad.abs().sum(dim=(1, 2, 3)) > 0
    assert got.tolist() == expected.tolist()


# Knobs of terms a run does not train, changed all at once: the run's steps and its cache key stay the same.
ONLY_MIM = ("variant=s4mim", "fa.weight=0", "smim.weight=0")
UNREAD = {  # run: (its settings, the knobs it does not read)
    "supervised": (("variant=supervised",), ("unimatch.threshold=0.5", "unimatch.feature_perturbation=false",
                   "mim.ratio=0.3", "mim.head=decoder", "fa.feature=decoder", "smim.view=extra")),
    "unimatch": (("variant=unimatch",), ("mim.ratio=0.3", "mim.mode=plain", "mim.head=decoder", "fa.weight=0.5",
                 "fa.stop_grad=false", "smim.view=extra", "smim.ratio=0.25")),
    "cmim only": (ONLY_MIM, ("fa.feature=decoder", "fa.stop_grad=false", "smim.view=extra", "smim.pixels=visible")),
    "plain mim": ((*ONLY_MIM, "mim.mode=plain"), ("mim.input=isolated", "fa.feature=decoder", "smim.ratio=0.25")),
}  # fmt: skip


@pytest.mark.parametrize("run", list(UNREAD))
def test_knobs_of_terms_a_run_does_not_train_change_neither_its_steps_nor_its_cache_key(tiny_config, run):
    from pipeline.orchestration.hashing import stage_hash

    settings, unread = UNREAD[run]
    base = ("unimatch.threshold=0.0", *settings)
    config, changed = tiny_config(*base), tiny_config(*base, *unread)
    batches = _batches(2, seed=3)
    engines = []
    for c in (config, changed):
        engine = _engine(c, c.variant)
        torch.manual_seed(2)
        for batch in batches:
            engine.train_step(*batch)
        engines.append(engine)
    torch.testing.assert_close(_params(engines[0]), _params(engines[1]), rtol=0, atol=0)
    for stage in ("train", "evaluate"):
        assert stage_hash(config, stage, "inputs") == stage_hash(changed, stage, "inputs"), stage


@pytest.mark.parametrize(
    ("base", "knob"),
    [(("variant=unimatch",), "unimatch.threshold=0.5"), (("variant=s4mim", "smim.weight=0"), "mim.ratio=0.3"),
     (("variant=s4mim",), "smim.pixels=visible"), (("variant=s4mim",), "fa.feature=decoder"),
     (("variant=s4mim", "mim.mode=none", "fa.weight=0"), "mim.patch=4"),
     ((*ONLY_MIM,), "mim.input=isolated")],
)  # fmt: skip
def test_knobs_of_terms_a_run_trains_change_its_cache_key(tiny_config, base, knob):
    from pipeline.orchestration.hashing import stage_hash

    assert stage_hash(tiny_config(*base), "train") != stage_hash(tiny_config(*base, knob), "train")
