"""The global update learns what the tasks say: closed-form fixed points, exact steps, known-answer families.

Pure-function tests check the natural-gradient step against the closed-form minimiser of the outer objective
(itself checked against a brute-force minimisation with `torch.distributions`). Trainer tests check that one
step is exactly ``global -= eps * direction`` whatever the Trainer's clipping or learning rate, and meta-train
a tiny model on generated families whose answer is known (a shared offset, a known spread). Each family test
carries a control that shows it can fail: the paper-literal ``global_update="gradient"`` learns the same
width on both families.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from _tasks import task_family, tiny_lm
from peft import get_peft_model
from torch.distributions import Gamma, Normal, kl_divergence

import peft_abmll
from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments, TaskEncoder
from peft_abmll.algorithms import ABMLLView, inner_loop
from peft_abmll.baselines import METHODS, train_method
from peft_abmll.bayes import closed_form_global_moments, global_variance_direction
from peft_abmll.fused import ScaleSpec, _block_moments, _prescaled
from peft_abmll.global_update import HyperPrior, abmll_direction
from peft_abmll.tuner.config import BETA_FULL_SIZE, size_scaled_beta

# ------------------------------------------------------------------------------------------- pure functions
PRIOR = HyperPrior(weight=0.2, a0=1.5, b0=0.5 * 2e-3**2, mean_std=1.0)


def test_closed_form_is_stationary_for_the_reference_objective():
    """The reference itself: the gradient of sum_i KL - n w log p(m, v), written with torch.distributions, is 0.

    ``log p`` is the Normal density of the mean and the Gamma density of the precision ``1 / v``, as stated.
    """
    torch.manual_seed(0)
    n, entries = 4, 5
    means = 1e-2 * torch.randn(n, entries, dtype=torch.float64)
    variances = (1e-2 * torch.rand(n, entries, dtype=torch.float64)) ** 2 + 1e-6
    w, a0, b0, mean_std = 0.3, 2.0, 1e-4, 0.05
    ref_mean, ref_var = closed_form_global_moments(means, variances, prior_weight=w, a0=a0, b0=b0, mean_std=mean_std)
    mean, log_var = ref_mean.clone().requires_grad_(), ref_var.log().clone().requires_grad_()
    var = log_var.exp()
    kl = kl_divergence(Normal(means, variances.sqrt()), Normal(mean, var.sqrt())).sum()
    log_prior = Normal(0.0, mean_std).log_prob(mean).sum() + Gamma(a0, b0).log_prob(1 / var).sum()
    (kl - n * w * log_prior).backward()
    scale = (means.abs().max() / variances.min()).item()  # the size of one KL gradient term
    assert mean.grad.abs().max() < 1e-9 * scale
    assert log_var.grad.abs().max() < 1e-6 * n  # each task contributes terms of order 1
    # and it is a minimum: moving either moment raises the objective
    for dm, dv in ((1e-4, 0.0), (-1e-4, 0.0), (0.0, 0.05), (0.0, -0.05)):
        m2, v2 = ref_mean + dm, ref_var * (1 + dv)
        kl2 = kl_divergence(Normal(means, variances.sqrt()), Normal(m2, v2.sqrt())).sum()
        lp2 = Normal(0.0, mean_std).log_prob(m2).sum() + Gamma(a0, b0).log_prob(1 / v2).sum()
        assert kl2 - n * w * lp2 > kl.detach() - n * w * log_prior.detach()


def test_variance_direction_vanishes_exactly_at_the_closed_form():
    torch.manual_seed(1)
    means, variances = torch.randn(3, 7, dtype=torch.float64), torch.rand(3, 7, dtype=torch.float64) + 0.1
    mean, var = closed_form_global_moments(means, variances, prior_weight=0.5, a0=1.5, b0=0.2)
    total = sum(
        global_variance_direction(var, variances[i], means[i] - mean, prior_weight=0.5, a0=1.5, b0=0.2)
        for i in range(3)
    )
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-12, rtol=0)


def _factors(d_out: int, d_in: int, r: int, std: float, seed: int, spec: ScaleSpec) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean_A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    mean_B = 1e-2 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    if spec.scale_type == "linear":
        value = ((std - spec.scale_floor) / (spec.scaling * r)) ** 0.5
        scale_A = value * (1 + 0.3 * torch.randn(r, d_in, generator=g, dtype=torch.float64))
        scale_B = value * (1 + 0.3 * torch.randn(d_out, r, generator=g, dtype=torch.float64))
    else:
        scale_A = 0.3 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
        scale_B = 0.3 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    return [mean_A, mean_B, scale_A, scale_B]


def _moments(factors: list[torch.Tensor], spec: ScaleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    mean_A, mean_B, scale_A, scale_B = factors
    return spec.scaling * mean_B @ mean_A, peft_abmll.bayes.entry_variance(
        scale_A, scale_B, scale_type=spec.scale_type, scaling=spec.scaling, scale_floor=spec.scale_floor, rho0=spec.rho0
    ).double()


def _iterate(global_: list[torch.Tensor], locals_: list[list[torch.Tensor]], spec, prior, eps, steps) -> None:
    """``steps`` global updates against fixed local posteriors, averaged over them (one meta-batch)."""
    for _ in range(steps):
        directions = [abmll_direction(global_, local, spec, prior)[0] for local in locals_]
        for i, param in enumerate(global_):
            param -= eps * sum(d[i] for d in directions) / len(directions)


@pytest.mark.parametrize("spec", [ScaleSpec("linear", 2.0, 1e-6), ScaleSpec("softplus", 2.0, 1e-6, -6.0)])
def test_repeated_global_updates_converge_to_the_closed_form_minimiser(spec):
    """Fixed adapted posteriors: mean and variance of every entry reach the closed form (full-rank factors).

    The local means share the global ``A`` and differ in ``B`` (what the inner loop mostly moves), so the
    factor-space mean step reaches the weight-space mean exactly; the variance step is the projected natural
    gradient. Tolerance: 1e-4 relative on every entry, after 300 steps at eps = 0.5. The Normal hyperprior on
    the means shrinks them with the layer's mean variance (`abmll_direction`), so the mean matches the
    per-entry closed form up to ``w * |var - mean var| / mean_std**2`` (here 1e-4; 1e-6 at the defaults).
    """
    d_out, d_in = 6, 5
    global_ = _factors(d_out, d_in, r=d_in, std=2e-3, seed=0, spec=spec)
    locals_ = []
    for seed in (1, 2, 3):
        local = _factors(d_out, d_in, r=d_in, std=4e-3, seed=seed, spec=spec)
        local[0] = global_[0].clone()
        locals_.append(local)
    _iterate(global_, locals_, spec, PRIOR, eps=0.5, steps=300)
    moments = [_moments(local, spec) for local in locals_]
    ref_mean, ref_var = closed_form_global_moments(
        torch.stack([m for m, _ in moments]),
        torch.stack([v for _, v in moments]),
        prior_weight=PRIOR.weight,
        a0=PRIOR.a0,
        b0=PRIOR.b0,
        mean_std=PRIOR.mean_std,
    )
    mean, var = _moments(global_, spec)
    shrink_error = PRIOR.weight * (ref_var - ref_var.mean()).abs().max().item() / PRIOR.mean_std**2
    torch.testing.assert_close(mean, ref_mean, rtol=2 * shrink_error, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=0)


def test_mean_step_is_reptile_in_factor_space():
    """With local ``A`` differing too, the mean converges to ``s * mean(B_i) @ mean(A_i)`` (Reptile's fixed point)."""
    spec = ScaleSpec("linear", 2.0, 1e-6)
    prior = dataclasses.replace(PRIOR, mean_std=float("inf"))
    global_ = _factors(6, 5, 5, 2e-3, 0, spec)
    locals_ = [_factors(6, 5, 5, 3e-3, seed, spec) for seed in (4, 5)]
    _iterate(global_, locals_, spec, prior, eps=0.5, steps=200)
    expected = (
        spec.scaling * torch.stack([lo[1] for lo in locals_]).mean(0) @ torch.stack([lo[0] for lo in locals_]).mean(0)
    )
    torch.testing.assert_close(_moments(global_, spec)[0], expected, rtol=1e-6, atol=1e-12)


def test_variance_step_has_a_trust_region():
    """A target 1e4 times the current variance: one step at eps = 1 about doubles the std (not x100).

    The per-entry step is clamped at ``|sigma|``; both factors move, so the product adds a second-order term.
    """
    spec = ScaleSpec("linear", 2.0, 1e-6)
    global_ = _factors(6, 5, 5, 1e-3, 0, spec)
    local = [t.clone() for t in global_]
    local[1] = local[1] + 1.0  # means far apart: the spread term dominates the target
    before = _moments(global_, spec)[1].sqrt()
    direction = abmll_direction(global_, local, spec, PRIOR)[0]
    after = _moments([g - d for g, d in zip(global_, direction)], spec)[1].sqrt()
    target = (_moments(global_, spec)[1] + (_moments(local, spec)[0] - _moments(global_, spec)[0]).square()).sqrt()
    assert (target > 50 * before).all()
    assert (after > 1.5 * before).all() and (after < 2.5 * before).all()


def _reference_direction(global_, local, spec, prior, max_relative_step=1.0, damping=1e-3):
    """`abmll_direction` written plainly on dense moments with `bayes.global_variance_direction`."""
    from peft_abmll.global_update import _solve_left, _solve_right

    dense = [_block_moments(_prescaled(tuple(f), spec), slice(None), spec) for f in (global_, local)]
    mp, mq = dense
    diff = mq["mean"] - mp["mean"]
    direction_var = global_variance_direction(
        mp["var"], mq["var"], diff, prior_weight=prior.weight, a0=prior.a0, b0=prior.b0
    )
    sigma = mp["sigma"]
    per_sigma = torch.nan_to_num(direction_var / (2 * sigma), nan=0.0)
    limit = max_relative_step * sigma.abs()
    per_sigma = torch.maximum(torch.minimum(per_sigma, limit), -limit)
    raw = per_sigma / (spec.scaling if mp["dsigma"] is None else mp["dsigma"].clamp_min(1e-12))
    shrink = prior.weight * mp["var"].mean() / prior.mean_std**2
    return [
        global_[0] - local[0],
        global_[1] - local[1] + shrink * global_[1],
        0.5 * _solve_left(global_[3], global_[3].T @ raw, damping),
        0.5 * _solve_right(global_[2], raw @ global_[2].T, damping),
    ]


@pytest.mark.parametrize("scale_type", ["softplus", "linear"])
def test_direction_matches_the_plain_dense_reference(scale_type, monkeypatch):
    """The row-blocked, in-place direction (shared ``var_q + diff**2``, one rank-2r matmul for the mean
    difference) equals the plain formula of `bayes.global_variance_direction` on dense moments."""
    monkeypatch.setattr(peft_abmll.fused, "BLOCK_ENTRIES", 12)
    spec = ScaleSpec(scale_type, 2.0, 1e-4, rho0=-3.0)
    global_, local = _factors(7, 5, 3, 1e-2, 0, spec), _factors(7, 5, 3, 3e-2, 1, spec)
    got = abmll_direction(global_, local, spec, PRIOR)[0]
    for g, e in zip(got, _reference_direction(global_, local, spec, PRIOR)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("scale_type", ["softplus", "linear"])
def test_update_statistics_match_the_reference_densities(scale_type, monkeypatch):
    """The logged sums (KL, -log hyperprior, variances, spread, the two variance-step parts), assembled from
    shared dense sums over several row blocks, equal the element-wise reference with `torch.distributions`."""
    monkeypatch.setattr(peft_abmll.fused, "BLOCK_ENTRIES", 12)  # 7 x 5 entries: several row blocks
    spec = ScaleSpec(scale_type, 2.0, 1e-4, rho0=-3.0)
    global_, local = _factors(7, 5, 3, 1e-2, 0, spec), _factors(7, 5, 3, 3e-2, 1, spec)
    stats = abmll_direction(global_, local, spec, PRIOR)[1]
    dense = [_block_moments(_prescaled(tuple(f), spec), slice(None), spec) for f in (global_, local)]
    (mean_p, var_p), (mean_q, var_q) = ((m["mean"], m["var"]) for m in dense)  # float64, as the update runs
    kl = kl_divergence(Normal(mean_q, var_q.sqrt()), Normal(mean_p, var_p.sqrt())).sum()
    a0, b0, mean_std = (torch.tensor(v, dtype=torch.float64) for v in (PRIOR.a0, PRIOR.b0, PRIOR.mean_std))
    log_prior = Normal(0.0, mean_std).log_prob(mean_p) + Gamma(a0, b0).log_prob(1 / var_p)
    target = var_q + (mean_q - mean_p).square()
    expected = {
        "entries": 35.0,
        "kl": kl,
        "neg_log_prior": -log_prior.sum(),
        "global_var": var_p.sum(),
        "target_var": target.sum(),
        "spread": (mean_q - mean_p).square().sum(),
        "global_mean_sq": mean_p.square().sum(),
        "var_step_kl": (var_p - target).abs().sum(),
        "var_step_prior": (2 * PRIOR.weight * ((PRIOR.a0 - 1) * var_p - PRIOR.b0)).abs().sum(),
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(float(value), rel=1e-9, abs=1e-12), key


# ------------------------------------------------------------------------------------------- the trainer
def _args(tmp_path, **kwargs) -> MetaTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        inner_learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
        answer_format="letter",  # the families' known answer is a shared offset in letter space
    )
    return MetaTrainingArguments(**{**defaults, **kwargs})


def _abmll(tok, **config) -> torch.nn.Module:
    with peft_abmll.data.seeded_torch_rng(0):
        return get_peft_model(tiny_lm(tok, seed=0), ABMLLConfig(**config))


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@pytest.fixture(scope="module")
def shared_rule():
    """Every task's answer is the first option: a shared offset, tasks agree (narrow family)."""
    return task_family(num_tasks=6, per_task=24, seed=0, rule="first")


@pytest.fixture(scope="module")
def disagreeing():
    """Task t's answer is option t mod 3: the same questions, solutions far apart (wide family)."""
    return task_family(num_tasks=6, per_task=24, seed=0, rule="task")


@pytest.mark.parametrize("algorithm", ["abmll", "reptile"])
def test_one_trainer_step_is_exactly_eps_times_the_direction(algorithm, tok, shared_rule, tmp_path):
    if algorithm == "abmll":
        model = _abmll(tok)
    else:
        model = get_peft_model(
            tiny_lm(tok), peft_abmll.baselines.default_lora_config(target_modules=["q_proj", "v_proj"])
        )
    args = _args(tmp_path, meta_algorithm=algorithm, outer_step_size=0.3, max_grad_norm=0.0)
    trainer = MetaTrainer(model=model, args=args, train_dataset=shared_rule, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    before = _snapshot(trainer.view.global_params())
    trainer.training_step(trainer.model, trainer.train_dataset[0])
    adapted = _snapshot(trainer.view.local_params())
    direction, _ = trainer.view.outer_direction()
    trainer.optimizer.step()
    after = trainer.view.global_params()
    for b, a, d, loc in zip(before, after, direction, adapted):
        torch.testing.assert_close(a, b - 0.3 * d, rtol=0, atol=1e-7)
        if algorithm == "reptile":  # Reptile: global += eps * (local - global)
            torch.testing.assert_close(a, b + 0.3 * (loc - b), rtol=0, atol=1e-7)


def test_clipping_and_learning_rate_do_not_change_the_update(tok, shared_rule, tmp_path, caplog):
    """max_grad_norm (ignored, with a warning) and learning_rate (first-order term only) leave the run identical."""
    runs = {}
    settings = {"plain": {}, "clip": {"max_grad_norm": 0.01}, "lr10": {"learning_rate": 5e-4}}
    for name, extra in settings.items():
        with caplog.at_level(logging.WARNING, logger="peft_abmll.meta.arguments"):
            args = _args(tmp_path / name, **extra)
        trainer = MetaTrainer(model=_abmll(tok), args=args, train_dataset=shared_rule, processing_class=tok)
        trainer.train()
        runs[name] = _snapshot(trainer.view.global_params())
    assert "max_grad_norm=0.01 is ignored" in caplog.text
    for name in ("clip", "lr10"):
        for a, b in zip(runs["plain"], runs[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedule_scales_the_step_and_nothing_else(tok, shared_rule, tmp_path):
    """Constant vs linear schedule: the first steps agree, the second differs exactly by the schedule's factor."""
    deltas = {}
    for schedule in ("constant", "linear"):
        trainer = MetaTrainer(
            model=_abmll(tok),
            args=_args(tmp_path / schedule, max_steps=4, lr_scheduler_type=schedule),
            train_dataset=shared_rule,
            processing_class=tok,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=4)
        steps = []
        for code in range(2):
            before = _snapshot(trainer.view.global_params())
            trainer.training_step(trainer.model, trainer.train_dataset[code])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad()
            steps.append([a - b for a, b in zip(trainer.view.global_params(), before)])
        deltas[schedule] = steps
    for a, b in zip(deltas["constant"][0], deltas["linear"][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(deltas["constant"][1], deltas["linear"][1]):
        # linear decay over 4 steps: factors 1, 3/4, ...; float32 parameters round at ~1e-9
        torch.testing.assert_close(b, a * 3 / 4, rtol=1e-4, atol=1e-8)


def _meta_train(tok, family, tmp_path, steps: int = 40, beta: float = 0.0, **kwargs) -> MetaTrainer:
    trainer = MetaTrainer(
        model=_abmll(tok, beta=beta),
        args=_args(tmp_path, max_steps=steps, **{"logging_steps": steps, **kwargs}),
        train_dataset=family,
        processing_class=tok,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("global_update", ["natural", "gradient"])
def test_wider_family_learns_a_wider_global_std(global_update, tok, shared_rule, disagreeing, tmp_path):
    """Same questions, solutions that agree vs disagree across tasks: the learned width follows (2 seeds).

    Control: the paper-literal ``"gradient"`` update learns the same width on both families (within 3 %),
    which is the data-blindness this test exists to catch.
    """
    ratios = []
    for seed in (0, 1):
        wide = _meta_train(tok, disagreeing, tmp_path / "w", global_update=global_update, seed=seed).view.tuner
        narrow = _meta_train(tok, shared_rule, tmp_path / "n", global_update=global_update, seed=seed).view.tuner
        ratios.append(wide.median_posterior_std() / narrow.median_posterior_std())
    if global_update == "natural":
        assert min(ratios) > 1.5, ratios
    else:
        assert all(abs(r - 1) < 0.03 for r in ratios), ratios


def test_shared_offset_moves_the_global_mean_toward_it(tok, shared_rule, tmp_path):
    """All tasks answer 'the first option': the global mean alone (no adaptation) learns it on unseen tasks."""
    held_out = task_family(num_tasks=3, per_task=20, seed=7, prefix="new", rule="first")
    encoder = TaskEncoder(tok, answer_format="letter")

    def zero_shot(model) -> float:
        examples = [row for rows in peft_abmll.prepare_tasks(held_out).values() for row in rows]
        probs = peft_abmll.predict_proba(model, examples, encoder=encoder)
        return (probs.argmax(-1) == 0).float().mean().item()

    before = zero_shot(_abmll(tok))
    after = zero_shot(_meta_train(tok, shared_rule, tmp_path, steps=40).model)
    assert before < 0.5 < 0.9 < after, (before, after)


def test_beta_keeps_the_local_posterior_near_the_global_and_changes_what_is_learned(tok, disagreeing, tmp_path):
    examples = peft_abmll.prepare_tasks(disagreeing)["t1"]
    encoder = TaskEncoder(tok, answer_format="letter")
    batches = [encoder.batch(examples[i : i + 2]) for i in range(0, 10, 2)]
    kls = {}
    for beta in (0.0, 1.0):
        model = _abmll(tok, init_weights=False)
        view = ABMLLView(model, beta=beta)
        model.train()
        torch.manual_seed(0)
        with view.local_mode():
            inner_loop(model, view, batches, lr=1e-2, fresh=True)
        kls[beta] = view.tuner.kl_divergence().item() / view.tuner.num_adapted_entries()
    assert kls[1.0] < 0.5 * kls[0.0], kls
    trainers = {beta: _meta_train(tok, disagreeing, tmp_path / str(beta), beta=beta) for beta in (0.0, 1.0)}
    learned = {beta: trainer.view.tuner.median_posterior_std() for beta, trainer in trainers.items()}
    assert learned[1.0] < 0.5 * learned[0.0], learned
    # the hyperprior is a weak prior: the KL's part of the variance step outweighs it
    last = [e for e in trainers[1.0].state.log_history if "var_step_kl_per_entry" in e][-1]
    assert last["var_step_kl_per_entry"] > 2 * last["var_step_hyperprior_per_entry"], last


def test_kl_per_entry_is_the_sum_over_the_number_of_entries(tok):
    model = _abmll(tok, init_weights=False)
    tuner = peft_abmll.algorithms.abmll_tuner(model)
    with torch.no_grad():
        for p in tuner.local_parameters():
            p.mul_(1.1)
    expected = sum(layer.in_features * layer.out_features for layer, _ in tuner.abmll_layers_with_adapter())
    assert tuner.num_adapted_entries() == expected
    reg, _ = ABMLLView(model, beta=2.0).inner_regularizer()
    torch.testing.assert_close(reg, 2.0 * tuner.kl_divergence() / expected)
    summed = ABMLLView(get_peft_model(tiny_lm(tok), ABMLLConfig(kl_reduction="sum", beta=2.0)))
    assert summed.kl_per_entry is False


def test_update_logs_are_per_entry(tok, shared_rule, tmp_path):
    trainer = _meta_train(tok, shared_rule, tmp_path, steps=2, logging_steps=1)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    keys = {
        "nll",
        "outer_kl_per_entry",
        "hyperprior_per_entry",
        "global_mean_rms",
        "global_std_rms",
        "target_std_rms",
        "var_step_kl_per_entry",
        "var_step_hyperprior_per_entry",
    }
    assert logged and keys <= set(logged[0])
    assert logged[0]["loss"] == pytest.approx(logged[0]["nll"])  # the logged loss is the data term


# ------------------------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("method", METHODS)
def test_every_method_depends_on_the_seed_alone(method, tok, shared_rule, tmp_path):
    """Initialisation and one episode of training: same seed, whatever ran before -> the same adapter."""

    def trained(seed: int, noise: int) -> list[torch.Tensor]:
        torch.manual_seed(noise)  # whatever ran before in the process
        model = train_method(method, lambda: tiny_lm(tok), tok, shared_rule, _args(tmp_path, max_steps=1, seed=seed))
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "abmll_" in n]

    a, b, c = trained(0, noise=1), trained(0, noise=2), trained(1, noise=1)
    assert a and all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_adapter_saved_before_kl_reduction_keeps_its_summed_beta(tok, tmp_path):
    """An adapter_config.json without kl_reduction (older peft-abmll) loads with 'sum', the meaning of its beta."""
    import json

    from peft import PeftModel

    model = get_peft_model(tiny_lm(tok), ABMLLConfig(beta=1e-7))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["kl_reduction"] == "mean"
    del saved["kl_reduction"]
    path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(tiny_lm(tok), tmp_path)
    assert loaded.peft_config["default"].kl_reduction == "sum"
    assert loaded.peft_config["default"].beta == 1e-7


def test_size_scaled_beta_is_the_papers_summed_weight_up_to_smollm2_size() -> None:
    """``beta=None`` means 1e-5 per entry of a summed KL up to SmolLM2-135M's 23.2 M entries (232 there), then 232."""
    smollm2 = 30 * (576 * 576 + 576 * 192 + 576 * 576)  # q, v (3 kv heads of 64), o on 30 layers
    assert smollm2 == BETA_FULL_SIZE
    assert size_scaled_beta(smollm2) == pytest.approx(232.2432)  # the benchmark's measured --beta 232
    assert size_scaled_beta(5120) == pytest.approx(0.0512)
    assert size_scaled_beta(10 * smollm2) == pytest.approx(232.2432)  # constant beyond: ~ the paper's 8B choice
    for n in (5120, smollm2, 10 * smollm2):  # 'sum' weighs the summed KL: the same pull per entry
        assert size_scaled_beta(n, "sum") * n == pytest.approx(size_scaled_beta(n))
    with pytest.raises(ValueError, match="at least one entry"):
        size_scaled_beta(0)


def test_beta_none_is_set_from_the_adapter_size_when_built_and_saved(tok, tmp_path):
    """Each adapter gets ``size_scaled_beta`` of its own entries at injection; the saved config carries the number,
    an explicit beta is left alone, and the meta-learning view and the model's own loss use it."""
    from peft import PeftModel

    config = ABMLLConfig()
    assert config.beta is None
    model = get_peft_model(tiny_lm(tok), config)
    n = model.base_model.num_adapted_entries()
    assert n == sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "abmll_global_mean_A"))
    assert model.peft_config["default"].beta == size_scaled_beta(n)
    assert ABMLLView(model).beta == size_scaled_beta(n)
    assert model.peft_config["default"].training_loss_weight == 1.0  # plain Trainer: one nat per entry, as measured
    assert ABMLLView(model, beta=2.0).beta == 2.0  # MetaTrainingArguments.beta still overrides for one run
    model.add_adapter("q_only", ABMLLConfig(target_modules=["q_proj"], kl_reduction="sum"))
    n_q = model.base_model.num_adapted_entries("q_only")
    assert n_q < n and model.peft_config["q_only"].beta == pytest.approx(size_scaled_beta(n_q, "sum"))
    assert model.peft_config["q_only"].loss_beta == pytest.approx(1.0 / n_q)  # the same nat per entry, summed
    model.add_adapter("fixed", ABMLLConfig(beta=0.5))
    assert model.peft_config["fixed"].beta == model.peft_config["fixed"].training_loss_weight == 0.5  # left alone
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_lm(tok), tmp_path)
    assert loaded.peft_config["default"].beta == size_scaled_beta(n)
    assert loaded.peft_config["default"].loss_beta == 1.0
    loaded.peft_config["default"].beta = loaded.peft_config["default"].loss_beta = None  # a path past injection
    assert ABMLLView(loaded).beta == size_scaled_beta(n) and loaded.peft_config["default"].loss_beta == 1.0
    with pytest.raises(ValueError, match="build it first"):
        _ = ABMLLConfig().training_loss_weight


def test_a_beta_set_on_the_wrapped_config_is_used_and_saved(tok, tmp_path):
    """A beta set on the wrapped model's config (the paper's 1e-7 on a summed KL, say): the meta-learning view
    weighs the inner KL with it and the saved adapter carries it."""
    from peft import PeftModel

    model = get_peft_model(tiny_lm(tok), ABMLLConfig())
    model.peft_config["default"].beta = 0.5
    assert ABMLLView(model).beta == 0.5
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_lm(tok), tmp_path)
    assert loaded.peft_config["default"].beta == 0.5


def test_bad_global_update_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"prior_a0 > 1"):
        ABMLLConfig(prior_a0=1.0)  # prior_b0=None puts the mode at init_std, which needs a0 > 1
    assert ABMLLConfig(prior_a0=1.0, prior_b0=0.01).gamma_rate == 0.01  # ABML's own prior, explicitly
    assert ABMLLConfig(init_std=2e-3).gamma_rate == pytest.approx(0.5 * 4e-6)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="outer_step_size"):
            _args(tmp_path, outer_step_size=bad)
    with pytest.raises(ValueError, match="global_update"):
        _args(tmp_path, global_update="adam")


def test_a_standard_deviation_of_exactly_zero_gives_a_finite_step():
    """The linear scale's signed sigma can cross zero; an entry sitting on 0 must not poison the update."""
    spec = ScaleSpec("linear", 1.0, 0.0)
    global_ = _factors(4, 3, 3, 1e-3, 0, spec)
    global_[3][0] = 0.0  # row 0 of B_scale: sigma = 0 on a whole row
    local = [t.clone() for t in global_]
    local[1][1:] += 0.01  # row 0 stays: there the target variance is 0 too, and the step is 0 / 0
    direction, _ = abmll_direction(global_, local, spec, dataclasses.replace(PRIOR, weight=0.0))
    assert all(torch.isfinite(d).all() for d in direction)


def test_a_non_finite_global_step_is_refused_before_it_reaches_the_adapter(tok, shared_rule, tmp_path):
    from peft_abmll.algorithms import NonFiniteLossError

    trainer = MetaTrainer(model=_abmll(tok), args=_args(tmp_path), train_dataset=shared_rule, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    before = _snapshot(trainer.view.global_params())
    real = trainer.view.outer_direction

    def poisoned():
        directions, logs = real()
        directions[0] = torch.full_like(directions[0], float("nan"))
        return directions, logs

    trainer.view.outer_direction = poisoned
    with pytest.raises(NonFiniteLossError, match="global-update"):
        trainer.training_step(trainer.model, trainer.train_dataset[0])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.view.global_params()))
