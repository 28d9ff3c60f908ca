"""The LoRA assertions: each failure message is a diagnosis (the numbers, what they mean, the fix).

Defaults come from the active team policy (set by the plugin from pyproject.toml or
`--lora-policy`, or by `use_policy`), so a test states *what* it checks and the policy file
states the numbers. Nothing here imports pytest or torch at import time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pytest_lora.core.curves import analyze_overfit, analyze_plateau
from pytest_lora.core.errors import LoraAssertionError, LoraPolicyWarning
from pytest_lora.core.policy import Policy, active_policy, use_policy
from pytest_lora.core.thresholds import beside, limit_text
from pytest_lora.model.adapters import as_lora_config, base_layer, matched_modules
from pytest_lora.model.counting import (
    ParamCount,
    adapter_weights,
    count_parameters,
    describe_targets,
    lora_layers,
    lora_module_shapes,
)
from pytest_lora.model.estimate import module_features, rank_setting


def _fail(lines: Sequence[str]) -> NoReturn:
    __tracebackhide__ = True
    raise LoraAssertionError("\n".join(lines))


def _peft_config(model: Any) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    return configs.get("default") or next(iter(configs.values()), None)


def _unwrap_base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --- budget ------------------------------------------------------------------------------------


def assert_param_budget(model: Any, min_pct: float | None = None, max_pct: float | None = None) -> ParamCount:
    """The trainable share of all parameters (4-bit counted unpacked) is within the budget.

    The guide's validation step asks for 0.05-1% on real models; tiny models need their own
    budget in the policy. On failure the message gives the rank that would meet the budget.
    """
    __tracebackhide__ = True
    policy = active_policy()
    low = policy.min_trainable_pct if min_pct is None else min_pct
    high = policy.max_trainable_pct if max_pct is None else max_pct
    count = count_parameters(model)
    if low <= count.percent <= high:
        return count
    shapes = lora_module_shapes(model)
    per_rank = sum(s.per_rank for s in shapes)
    lora = sum(s.parameters for s in shapes)
    other_trainable = count.trainable - lora
    frozen = count.total - lora
    ranks = sorted({s.r for s in shapes})
    if count.percent < low:
        shown = beside(count.percent, low, operator.ge, ok=False, precision=4)
        head = f"LoRA parameter budget not met: {shown}% < {limit_text(low)}% (min)"
        needed = _rank_for(low / 100, per_rank, other_trainable, frozen, ceil=True)
        fix = _rank_fix(needed, ranks, policy, ">=", "or add target modules")
    else:
        shown = beside(count.percent, high, operator.le, ok=False, precision=4)
        head = f"LoRA parameter budget exceeded: {shown}% > {limit_text(high)}% (max)"
        needed = _rank_for(high / 100, per_rank, other_trainable, frozen, ceil=False)
        fix = _rank_fix(needed, ranks, policy, "<=", "or adapt fewer modules (e.g. only q_proj, v_proj)")
    rank_text = f"r={ranks[0]}" if len(ranks) == 1 else f"r in {ranks}"
    detail = (
        f"{rank_text} on {describe_targets(shapes)}: {len(shapes)} modules, sum of r x (in + out)"
        if shapes
        else "no LoRA modules found"
    )
    packed = _packed_half(model)
    total_note = (
        f"4-bit weights counted unpacked, as PEFT does; a naive numel() sum would report {count.total - packed:,}"
        if packed
        else "all parameters"
    )
    lines = [
        head,
        f"  trainable  {count.trainable:>15,}   ({detail})",
        f"  total      {count.total:>15,}   ({total_note})",
    ]
    if other_trainable:
        lines.append(f"  of which {other_trainable:,} are trainable outside the adapters (modules_to_save, bias)")
    lines += [f"  budget     {low:g}% .. {high:g}% ({policy.source})", f"  fix: {fix}"]
    _fail(lines)
    return count  # pragma: no cover - _fail raises


def _rank_for(share: float, per_rank: int, fixed_trainable: int, frozen: int, *, ceil: bool) -> int | None:
    """The uniform rank whose trainable share is at the budget's edge: (r*S + E) / (N0 + r*S) = share."""
    if per_rank == 0 or share >= 1:
        return None
    exact = (share * frozen - fixed_trainable) / (per_rank * (1 - share))
    rank = math.ceil(exact - 1e-9) if ceil else math.floor(exact + 1e-9)
    return rank if rank >= 1 else None


def _rank_fix(needed: int | None, ranks: list[int], policy: Policy, op: str, otherwise: str) -> str:
    if needed is None:
        return f"no rank on these targets meets the budget: {otherwise}"
    allowed = [r for r in policy.ranks if (r >= needed if op == ">=" else r <= needed)]
    pick = (min(allowed) if op == ">=" else max(allowed)) if allowed else None
    current = f" (now r={ranks[0]})" if len(ranks) == 1 else ""
    text = f"r {op} {needed} on these targets{current}"
    if pick is not None:
        text += f"; the smallest policy rank that fits is r={pick}" if op == ">=" else f"; policy rank r={pick} fits"
    return f"{text}, {otherwise}"


def _packed_half(model: Any) -> int:
    """How much a naive numel() sum undercounts: half of every 4-bit weight."""
    return sum(int(p.numel()) for p in model.parameters() if type(p).__name__ == "Params4bit")


# --- alpha ratio --------------------------------------------------------------------------------


def _layer_settings(config_or_model: Any) -> tuple[Any, list[tuple[str, int, float, float]]]:
    """(config, [(where, r, alpha, scaling)]) from a PeftModel's layers or a config's patterns."""
    config = _peft_config(config_or_model)
    if config is not None:
        rows = []
        for name, module in config_or_model.named_modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                rows.append((name, module.r["default"], module.lora_alpha["default"], module.scaling["default"]))
        return config, rows
    config = as_lora_config(config_or_model)
    rows = []
    keys = ["(default)", *dict.fromkeys([*(config.rank_pattern or {}), *(config.alpha_pattern or {})])]
    for key in keys:
        r = (config.rank_pattern or {}).get(key, config.r)
        alpha = (config.alpha_pattern or {}).get(key, config.lora_alpha)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        rows.append((key, r, alpha, scaling))
    return config, rows


def assert_alpha_ratio(
    config_or_model: Any, ratio: float | None = None, *, tolerance: float | None = None, rslora: str | None = None
) -> None:
    """lora_alpha / r equals the policy's ratio (default 2.0), per module where patterns are set.

    rsLoRA (`use_rslora=True`) scales by alpha / sqrt(r); the policy's `rslora` rule says what
    is checked then: "scaling" (alpha / sqrt(r) == ratio), "alpha" (alpha / r == ratio) or
    "forbid". A PeftModel is checked through each layer's real `scaling`.
    """
    __tracebackhide__ = True
    base = active_policy()
    changes: dict[str, Any] = {  # each one typed by this function's signature
        k: v for k, v in {"alpha_ratio": ratio, "alpha_tolerance": tolerance, "rslora": rslora}.items() if v is not None
    }
    policy = dataclasses.replace(base, **changes) if changes else base
    config, rows = _layer_settings(config_or_model)
    if config.init_lora_weights is not True:
        warnings.warn(
            f"init_lora_weights={config.init_lora_weights!r}: the alpha = {policy.alpha_ratio:g} x r heuristic "
            "assumes PEFT's default init (lora_B = 0, Kaiming lora_A); with another init, measure the effective "
            "gradient scale instead of trusting the ratio",
            LoraPolicyWarning,
            stacklevel=2,
        )
    if config.use_rslora and policy.rslora == "forbid":
        _fail(
            [
                "rsLoRA is forbidden by the policy, but the config sets use_rslora=True",
                f"  scaling is lora_alpha / sqrt(r) = {rows[0][3]:.4g} instead of lora_alpha / r; serving stacks "
                "that ignore the flag would apply the wrong scale",
                f"  fix: use_rslora=False and lora_alpha = {policy.alpha_ratio:g} x r ({policy.source})",
            ]
        )
    bad = []
    for where, r, alpha, scaling in rows:
        want = policy.expected_alpha(r, config.use_rslora)
        assert want is not None  # None only for rsLoRA under "forbid", which failed above
        if not math.isclose(alpha, want, rel_tol=max(policy.alpha_tolerance, 1e-9)):
            bad.append((where, r, alpha, scaling, want))
    if not bad:
        return
    where, r, alpha, scaling, want = bad[0]
    same = [b for b in bad if (b[1], b[2]) == (r, alpha)]
    if len(same) > 1:  # a PeftModel's layers mostly share one setting: name the group, not its first member
        names = ", ".join(dict.fromkeys(b[0].rsplit(".", 1)[-1] for b in same))
        where = f"{len(same)} modules: {names}"
        bad = [b for b in bad if (b[1], b[2]) != (r, alpha)]
    else:
        bad = bad[1:]
    rule = "lora_alpha / sqrt(r)" if config.use_rslora and policy.rslora == "scaling" else "lora_alpha / r"
    actual_ratio = alpha / math.sqrt(r) if rule.endswith("sqrt(r)") else alpha / r
    close = functools.partial(math.isclose, rel_tol=max(policy.alpha_tolerance, 1e-9))  # the check above
    shown = beside(actual_ratio, policy.alpha_ratio, close, ok=False, precision=4)
    factor = beside(actual_ratio / policy.alpha_ratio, 1.0, close, ok=False, precision=2)
    lines = [
        f"LoRA alpha ratio off policy: {rule} = {alpha:g} / {_r_text(r, rule)} = {shown}, "
        f"policy wants {policy.alpha_ratio:g}" + (f" (at {where})" if where != "(default)" else ""),
        f"  effective scaling of the adapter output: {scaling:.4g} "
        f"({'rsLoRA: alpha / sqrt(r)' if config.use_rslora else 'alpha / r'})",
    ]
    if actual_ratio < policy.alpha_ratio:
        old_r = alpha / policy.alpha_ratio
        lines.append(
            f"  this is the alpha gotcha: lora_alpha={alpha:g} is the value for r={old_r:g}; at r={r} the update is "
            f"scaled by {factor}x the policy's, so training looks muted and the task "
            "looks harder than it is"
        )
    else:
        lines.append(
            f"  the update is scaled by {factor}x the policy's: an effectively larger "
            "learning rate, risking instability"
        )
    if bad:
        lines.append(f"  {len(bad)} more module(s)/pattern(s) off policy: {', '.join(b[0] for b in bad[:5])}")
    lines.append(f"  fix: lora_alpha = {want:g} for r={r}" + (f" ({where})" if where != "(default)" else ""))
    _fail(lines)


def _r_text(r: int, rule: str) -> str:
    return f"sqrt({r})" if rule.endswith("sqrt(r)") else str(r)


# --- shapes -------------------------------------------------------------------------------------


def assert_adapter_shapes(model: Any, config: Any = None) -> None:
    """Every targeted module has lora_A (r, in_features) and lora_B (out_features, r), r per module.

    Shapes are the logical ones (a 4-bit weight's storage shape is packed). Also: no trainable
    parameter outside the adapters except what `modules_to_save` / `bias` allow, and every
    target entry and pattern key matches a module.
    """
    __tracebackhide__ = True
    attached = _peft_config(model)
    if attached is None:
        _fail(["assert_adapter_shapes: the model has no LoRA adapter (not a PeftModel, or it was unloaded)"])
    config = attached if config is None else as_lora_config(config)
    base = _unwrap_base(model)
    expected = _expected_adapters(base, config)
    layers = dict(lora_layers(base))
    problems = []
    for name, (in_features, out_features), r, experts in expected:
        if name not in layers:
            problems.append(f"{name}: targeted by the config but has no LoRA adapter")
            continue
        a_weight, b_weight = adapter_weights(layers[name])
        in_features = in_features or int(layers[name].in_features)  # e.g. a convolution: PEFT's own reading
        out_features = out_features or int(layers[name].out_features)
        a_shape, b_shape = tuple(a_weight.shape)[:2], tuple(b_weight.shape)[:2]
        want_a, want_b = (r * experts, in_features), (out_features, r * experts)
        if a_shape != want_a or b_shape != want_b:
            per = f"r={r}" + (f" x {experts} experts" if experts > 1 else "")
            problems.append(f"{name}: lora_A {a_shape}, lora_B {b_shape}; expected {want_a}, {want_b} ({per})")
    unexpected = _stray_trainables(model, config)
    if not problems and not unexpected:
        return
    lines = [f"LoRA adapter shapes do not match the config ({len(problems)} module(s), {len(expected)} targeted)"]
    lines += [f"  {p}" for p in problems[:10]]
    if len(problems) > 10:
        lines.append(f"  ... and {len(problems) - 10} more")
    if unexpected:
        lines.append(
            f"  {len(unexpected)} trainable parameter(s) outside the adapters, not allowed by "
            f"modules_to_save / bias={config.bias!r}: {', '.join(unexpected[:5])}"
        )
        lines.append("  fix: freeze them, or list their modules in modules_to_save")
    if problems:
        lines.append(
            "  adapter shapes are fixed when the adapter is created: a checkpoint saved at another rank cannot be "
            "resumed with this config ('size mismatch for lora_A').\n"
            "  fix: check r / rank_pattern against the adapter you load; to change the rank, retrain from scratch"
        )
    _fail(lines)


def _expected_adapters(base: Any, config: Any) -> list[tuple[str, tuple[int, int], int, int]]:
    """(name, (in, out) features, rank, experts) of every adapter `config` creates on `base`.

    Features are read from the wrapped layers (0 where the shape rule does not know the kind); the
    parameters PEFT adapts directly (fused MoE experts, routers) come with one adapter pair per expert.
    """
    from pytest_lora.model.target_parameters import as_peft_sees_it, parameter_targets

    names = matched_modules(base, config)
    expected = [
        (name, module_features(base_layer(base.get_submodule(name))) or (0, 0), rank_setting(config, name)[1], 1)
        for name in names
    ]
    for shape in parameter_targets(base, as_peft_sees_it(base, config), names):
        expected.append((shape.name, (shape.in_features, shape.out_features), shape.r, shape.experts))
    return expected


def _stray_trainables(model: Any, config: Any) -> list[str]:
    names = []
    for name, param in model.named_parameters():
        if not param.requires_grad or "lora_" in name or "modules_to_save" in name:
            continue
        if name.endswith(".bias") and config.bias == "all":
            continue
        if name.endswith(".bias") and config.bias == "lora_only" and ".base_layer." in name:
            continue
        names.append(name)
    return names


# --- curves -------------------------------------------------------------------------------------


def _losses_of(losses_or_result: Any) -> list[float]:
    return list(getattr(losses_or_result, "losses", losses_or_result))


def _scaling_hint(result: Any) -> list[str]:
    """The run's config, and the alpha to fix first when alpha / r is off the policy."""
    config = getattr(result, "config", None)
    if config is None:
        return []
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    lines = [f"  config: r={config.r}, lora_alpha={config.lora_alpha:g} (effective scaling {scaling:.4g})"]
    want = active_policy().expected_alpha(config.r, config.use_rslora)
    if want is not None and not math.isclose(config.lora_alpha, want, rel_tol=1e-6):
        lines.append(
            f"  first check alpha: the policy's lora_alpha at r={config.r} is {want:g}; {config.lora_alpha:g} "
            f"scales the update by {config.lora_alpha / want:.3g}x, which alone can flatten the curve"
        )
    return lines


def assert_no_plateau(losses_or_result: Any, **overrides: Any) -> None:
    """The loss curve makes net progress: not flat, not oscillating in place, finite.

    `overrides` replace fields of the policy's plateau rule (window, min_delta, mode, patience,
    warmup, min_points, oscillation). Too few points raises `CurveError`: never a pass.
    """
    __tracebackhide__ = True
    rule = dataclasses.replace(active_policy().plateau, **overrides) if overrides else active_policy().plateau
    losses = _losses_of(losses_or_result)
    verdict = analyze_plateau(losses, rule)
    if verdict.ok:
        return
    unit, factor = ("%", 100) if rule.mode == "rel" else ("", 1)
    need = limit_text(rule.min_delta, scale=factor)
    if verdict.kind == "non_finite":
        assert verdict.bad_index is not None  # analyze_plateau names the point of every non-finite verdict
        lines = [
            f"LoRA training loss is {verdict.bad_value} at step {verdict.bad_index + 1} (of {len(losses)})",
            "  the run diverged: learning rate too high, alpha far above 2*r, or fp16 overflow",
            "  fix: lower the learning rate, keep lora_alpha = 2*r, use bfloat16 compute",
        ]
        _fail(lines)
    head = {
        "flat": "LoRA training loss plateaued (flat)",
        "oscillating": "LoRA training loss oscillates without net progress",
        "stalled": f"LoRA training loss stalled for the last {rule.patience} steps",
        "diverging": "LoRA training loss went up",
    }[verdict.kind]
    lines = [
        f"{head}: smoothed loss {verdict.start:.4f} -> {verdict.end:.4f} over {verdict.n_points} points "
        f"(window {rule.window}, {verdict.n_ignored} warm-up points ignored)",
        _progress_line(verdict, unit, factor, need),
    ]
    lines += _scaling_hint(losses_or_result)
    lines += [
        "  what it means: the adapter is not capturing the task: rank too low, or alpha too small for r "
        "(a muted update)",
        "  fix (rank guide): stop the run, reload the base fresh, raise r 2x (e.g. 8 -> 16), scale lora_alpha "
        "with it (alpha = 2r), retrain from scratch; do not resume a checkpoint with a new rank",
    ]
    _fail(lines)


def _progress_line(verdict: Any, unit: str, factor: float, need: str) -> str:
    """The comparison behind the verdict's kind, each number with the digits it takes to agree with it."""
    rule = verdict.rule
    improvement = beside(verdict.improvement, rule.min_delta, operator.ge, scale=factor) + unit
    mode = f"{rule.mode} mode"
    if verdict.kind == "oscillating":
        swing = beside(verdict.swing, rule.min_delta, operator.gt, scale=factor) + unit
        return (
            f"  improvement {improvement} against a typical step-to-step swing of {swing} (over min_delta {need}{unit} "
            f"and {rule.oscillation:g}x the improvement, {mode}): noise dominates progress (lr too high?)"
        )
    if verdict.kind == "stalled":
        gain = beside(verdict.stall_gain, rule.min_delta, operator.ge, scale=factor) + unit
        return (
            f"  improvement {improvement} overall, but the last {rule.patience} points beat the best before them by "
            f"only {gain} < {need}{unit} required (min_delta, patience {rule.patience}, {mode})"
        )
    return f"  improvement {improvement} < {need}{unit} required (min_delta, {mode})"


def assert_no_overfit(result: Any, val_losses: Sequence[float] | None = None, **overrides: Any) -> None:
    """Validation loss does not rise while training loss keeps falling (the guide's overfit symptom).

    Pass a `TrainResult`, or train losses plus `val_losses`.
    """
    __tracebackhide__ = True
    rule = dataclasses.replace(active_policy().overfit, **overrides) if overrides else active_policy().overfit
    train = _losses_of(result)
    val = list(val_losses if val_losses is not None else result.val_losses)
    verdict = analyze_overfit(train, val, rule)
    if verdict.ok:
        return
    if verdict.kind == "non_finite":
        _fail([f"{verdict.bad_curve} loss is {verdict.bad_value} at point {verdict.bad_index}: the run diverged"])
    unit, factor = ("%", 100) if rule.mode == "rel" else ("", 1)
    lines = [
        f"LoRA adapter overfits: validation loss rose {beside(verdict.rise, rule.tolerance, operator.gt, scale=factor)}"
        f"{unit} above its best "
        f"({verdict.val_best:.4f} -> {verdict.val_end:.4f}) while train loss fell "
        f"({verdict.train_start:.4f} -> {verdict.train_end:.4f})",
        f"  tolerance {limit_text(rule.tolerance, scale=factor)}{unit} ({rule.mode} mode)",
    ]
    lines += _scaling_hint(result)
    lines += [
        "  what it means: the rank is too high for the data: the adapter memorizes the training examples",
        "  fix (rank guide): lower r to 4-8, raise lora_dropout to 0.1-0.2, add weight_decay > 0",
    ]
    _fail(lines)


# --- whole policy -------------------------------------------------------------------------------


def assert_policy(config_or_model: Any, policy: Policy | None = None) -> None:
    """A config (or an attached model) obeys every rule of the policy that needs no training.

    Rank allowed, alpha ratio, dropout range, required / forbidden targets, and, for a model,
    the parameter budget. All violations are reported together.
    """
    __tracebackhide__ = True
    policy = policy or active_policy()
    model = config_or_model if _peft_config(config_or_model) is not None else None
    config = _peft_config(model) if model is not None else as_lora_config(config_or_model)
    problems = []
    ranks = {config.r, *(config.rank_pattern or {}).values()}
    off = sorted(r for r in ranks if r not in policy.ranks)
    if off:
        problems.append(f"r = {', '.join(map(str, off))} not in the policy's ranks {list(policy.ranks)}")
    if not policy.min_dropout <= config.lora_dropout <= policy.max_dropout:
        problems.append(
            f"lora_dropout = {config.lora_dropout:g} outside [{policy.min_dropout:g}, {policy.max_dropout:g}]"
        )
    targets = _target_names(config, model)
    missing = [t for t in policy.required_targets if t not in targets]
    if missing:
        problems.append(f"required target modules missing: {', '.join(missing)}")
    forbidden = [t for t in policy.forbidden_targets if t in targets]
    if forbidden:
        problems.append(f"forbidden target modules adapted: {', '.join(forbidden)}")
    checks: list[Callable[[], object]] = [lambda: assert_alpha_ratio(model or config)]
    if model is not None:
        checks.append(lambda: assert_param_budget(model))
    with use_policy(policy):
        for check in checks:
            try:
                check()
            except LoraAssertionError as exc:
                problems.append(str(exc).replace("\n", "\n    "))
    if problems:
        _fail([f"LoRA config violates the policy ({policy.source}):", *(f"  - {p}" for p in problems)])


def _target_names(config: Any, model: Any) -> set[str]:
    if model is not None:
        return {s.name.rsplit(".", 1)[-1] for s in lora_module_shapes(model)}
    targets = config.target_modules
    if targets is None:
        return set()
    return {targets} if isinstance(targets, str) else set(targets)
