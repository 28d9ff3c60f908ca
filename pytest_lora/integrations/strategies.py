"""Hypothesis strategies for LoRA configs: PEFT's option space, a team policy's space, and wrong values.

Teams do not want to check three hand-picked configs; they want "every config the policy admits is sound,
and every config it rejects is rejected for the right reason":

    from pytest_lora.integrations.strategies import policy_configs

    @given(config=policy_configs(Policy(ranks=(8, 16), required_targets=("q_proj", "v_proj"))))
    def test_policy_space(lora_adapters, config):
        with lora_adapters.attached(config) as model:
            assert_adapter_shapes(model)

In the style of `hypothesis.extra.*`: keyword-only arguments, validated when the strategy is built
(`InvalidArgument`), dependent draws (alpha from r) with `st.composite`. Configs are built with `st.builds`,
so a failing example is reported as a call that pastes back into code: `LoraConfig(r=1, lora_alpha=2, ...)`
with only the fields that differ from PEFT's defaults. peft is imported when the first config is drawn.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import string
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

from pytest_lora.core.policy import Policy
from pytest_lora.core.values import is_int, is_real
from pytest_lora.integrations.hypothesis_profile import register_profile

__all__ = [
    "LLAMA_TARGETS",
    "InvalidLoraValue",
    "config_repr",
    "invalid_lora_values",
    "lora_configs",
    "policy_configs",
]

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of Llama-style decoders (and of the built-in tiny model): the default target names."""

_BIASES = ("none", "all", "lora_only")
# Inits that need neither data nor a change of the base weights. "orthogonal" needs even ranks and a float
# base layer (on a 4-bit layer PEFT crashes in torch), so it is drawn only when asked for.
_INITS = (True, False, "gaussian", "orthogonal")
_DEFAULT_INITS: tuple[bool | str, ...] = (True, False, "gaussian")
_REFUSED_INITS = (
    "pissa, olora, corda and loftq rewrite the base weights (a shared base cannot be restored), eva and lora_ga "
    "need data, mica fails on a 4-bit base"
)

_Check = Callable[[str, Any], None]
# Alpha for rank r (use_rslora given), and the alpha for a rank_pattern entry's rank (None: no alpha_pattern).
_AlphaRule = Callable[[st.DrawFn, int, bool], tuple[float, Callable[[int], float] | None]]


# --- argument checks: each raises InvalidArgument naming the argument, the value and the fix ------------------


def _check_rank(name: str, value: object) -> None:
    if not is_int(value) or value < 1:  # type: ignore[operator]
        raise InvalidArgument(f"{name}={value!r}: a LoRA rank is an int >= 1, e.g. 8")


def _check_positive(name: str, value: object) -> None:
    if not is_real(value) or not 0 < value < math.inf:  # type: ignore[operator]
        raise InvalidArgument(f"{name}={value!r}: must be a finite number > 0, e.g. 16 for lora_alpha, 2 for a ratio")


def _check_dropout(name: str, value: object) -> None:
    if not is_real(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise InvalidArgument(f"{name}={value!r}: lora_dropout must be a number in [0, 1), e.g. 0.05")


def _check_choice(allowed: Sequence[object], why: str = "") -> _Check:
    def check(name: str, value: object) -> None:
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise InvalidArgument(f"{name}={value!r}: must be one of {', '.join(map(repr, allowed))}{why}")

    return check


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r}: must be True or False")


def _is_name_list(value: object) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)


def _check_targets(name: str, value: object) -> None:
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f'{name}="": name modules, e.g. ["q_proj", "v_proj"] or "all-linear"')
        return
    if not _is_name_list(value) or not value or "" in value:  # type: ignore[operator]
        raise InvalidArgument(
            f"{name}={value!r}: target modules are a non-empty list of module names (e.g. ['q_proj', 'v_proj']) "
            "or one string (a regex, or 'all-linear'); to choose among several, pass a list of those or a strategy"
        )


def _check_rank_pattern(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise InvalidArgument(f"{name}={value!r}: a rank_pattern is a dict of module name (regex) -> rank")
    for key, rank in value.items():
        _check_rank(f"{name}[{key!r}]", rank)


def _check_task_type(name: str, value: object) -> None:
    if value is None or value == "CAUSAL_LM":
        return
    from peft.utils.peft_types import TaskType

    allowed = [t.value for t in TaskType]
    if value not in allowed:
        raise InvalidArgument(f"{name}={value!r}: must be None or one of PEFT's task types: {', '.join(allowed)}")


def _check_layers(name: str, value: object) -> None:
    if value is None or (is_int(value) and value >= 0):  # type: ignore[operator]
        return
    if not isinstance(value, (list, tuple)) or not value or not all(is_int(v) and v >= 0 for v in value):
        raise InvalidArgument(f"{name}={value!r}: layer indices are None, an int >= 0 or a non-empty list of them")


def _strategy(name: str, arg: object, check: _Check, *, is_value: Callable[[object], bool] = _is_name_list) -> Any:
    """A value, a list (or tuple) of values to choose from, or a strategy (its draws are checked when drawn)."""
    if isinstance(arg, SearchStrategy):
        return arg.map(lambda value: _checked(name, value, check))
    if isinstance(arg, (list, tuple)) and not is_value(arg):
        if not arg:
            raise InvalidArgument(f"{name}=[]: an empty list offers nothing to draw; pass a value or a strategy")
        for value in arg:
            check(name, value)
        return st.sampled_from(arg)
    check(name, arg)
    return st.just(arg)


def _checked(name: str, value: Any, check: _Check) -> Any:
    check(f"a value drawn for {name}", value)
    return value


def _never_a_value(value: object) -> bool:
    return False


def _is_layer_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(is_int(v) for v in value)


def _names(name: str, value: object) -> list[str]:
    """The module names to draw targets from: a non-empty collection of names, never one string."""
    if isinstance(value, str) or not isinstance(value, Collection) or not _is_name_list(list(value)):
        raise InvalidArgument(f"{name}={value!r}: pass the module names to draw from, e.g. {list(LLAMA_TARGETS)!r}")
    _check_targets(name, list(value))
    return sorted(set(value))


# --- building configs -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Space:
    """Strategies for each LoraConfig field; `rank_pattern=None` draws one from the drawn targets."""

    ranks: SearchStrategy[int]
    alpha: _AlphaRule
    target_modules: SearchStrategy[Any]
    dropout: SearchStrategy[float]
    bias: SearchStrategy[str]
    use_rslora: SearchStrategy[bool]
    rank_pattern: SearchStrategy[dict[str, int] | None] | None
    init_lora_weights: SearchStrategy[bool | str]
    task_type: SearchStrategy[str | None]
    layers_to_transform: SearchStrategy[Any]


def _number(value: float) -> float:
    """16.0 -> 16, so the reported config reads like one a person wrote."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _fixed_alpha(alpha: SearchStrategy[float]) -> _AlphaRule:
    def rule(draw: st.DrawFn, r: int, use_rslora: bool) -> tuple[float, None]:
        return _number(draw(alpha)), None

    return rule


def _ratio_alpha(ratio: SearchStrategy[float]) -> _AlphaRule:
    def rule(draw: st.DrawFn, r: int, use_rslora: bool) -> tuple[float, Callable[[int], float]]:
        k = draw(ratio)
        return _number(k * r), lambda rank: _number(k * rank)

    return rule


def _default_alpha(draw: st.DrawFn, r: int, use_rslora: bool) -> tuple[float, Callable[[int], float] | None]:
    """The usual ratios (2r first: shrinking lands there), or an alpha chosen without looking at r."""
    if draw(st.booleans()):
        return _fixed_alpha(st.integers(1, 512))(draw, r, use_rslora)
    return _ratio_alpha(st.sampled_from([2, 1, 4, 0.5]))(draw, r, use_rslora)


@st.composite
def _config_kwargs(draw: st.DrawFn, space: _Space) -> dict[str, Any]:
    """LoraConfig keyword arguments that PEFT accepts, honouring its cross-field rules."""
    targets = draw(space.target_modules)
    layers = draw(space.layers_to_transform)
    if layers is not None and isinstance(targets, str):
        # PEFT: `layers_to_transform` cannot be used when `target_modules` is a str.
        layers = None
    use_rslora = draw(space.use_rslora)
    r = draw(space.ranks)
    alpha, pattern_alpha = space.alpha(draw, r, use_rslora)
    if space.rank_pattern is not None:
        rank_pattern = draw(space.rank_pattern) or {}
    elif isinstance(targets, str):
        rank_pattern = {}
    else:
        rank_pattern = draw(st.dictionaries(st.sampled_from(sorted(targets)), space.ranks, max_size=2))
    ranks = [r, *rank_pattern.values()]
    # PEFT: orthogonal init needs an even rank on every layer.
    init = draw(space.init_lora_weights.filter(lambda v: v != "orthogonal" or all(k % 2 == 0 for k in ranks)))
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "lora_dropout": draw(space.dropout),
        "bias": draw(space.bias),
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {key: pattern_alpha(rank) for key, rank in rank_pattern.items()} if pattern_alpha else {},
        "init_lora_weights": init,
        "task_type": draw(space.task_type),
        "layers_to_transform": layers,
    }


_ALWAYS_SHOWN = ("r", "lora_alpha")


def _builds(kwargs: dict[str, Any]) -> SearchStrategy[Any]:
    """`st.builds` with PEFT's defaults left out: Hypothesis reports the call, which pastes back as code."""
    from peft import LoraConfig

    defaults = _defaults()
    given = {k: v for k, v in kwargs.items() if k in _ALWAYS_SHOWN or v != defaults[k]}
    return st.builds(LoraConfig, **{k: st.just(v) for k, v in given.items()})


@functools.cache
def _defaults() -> dict[str, Any]:
    """PEFT's LoraConfig defaults, as a default instance holds them (after its own normalisation)."""
    from peft import LoraConfig

    default = LoraConfig()
    return {f.name: getattr(default, f.name) for f in dataclasses.fields(LoraConfig) if f.init}


@st.composite
def _configs(draw: st.DrawFn, space: _Space) -> Any:
    return draw(_builds(draw(_config_kwargs(space))))


# Defaults of `lora_configs`: the first branch of each `|` is where shrinking goes.
_RANKS = st.integers(1, 256) | st.sampled_from([4, 8, 16, 32, 64])
_TARGETS = st.lists(st.sampled_from(LLAMA_TARGETS), min_size=1, unique=True) | st.just("all-linear")
_DROPOUTS = st.floats(0.0, 1.0, exclude_max=True) | st.sampled_from([0.05, 0.1])
_BIAS_MODES = st.sampled_from(_BIASES)
_RSLORA = st.booleans()
_INIT_MODES = st.sampled_from(_DEFAULT_INITS)


def lora_configs(
    *,
    ranks: int | Sequence[int] | SearchStrategy[int] = _RANKS,
    alpha: float | Sequence[float] | SearchStrategy[float] | None = None,
    alpha_ratio: float | Sequence[float] | SearchStrategy[float] | None = None,
    target_modules: Any = _TARGETS,
    dropout: float | Sequence[float] | SearchStrategy[float] = _DROPOUTS,
    bias: str | Sequence[str] | SearchStrategy[str] = _BIAS_MODES,
    use_rslora: bool | Sequence[bool] | SearchStrategy[bool] = _RSLORA,
    rank_pattern: dict[str, int] | Sequence[dict[str, int]] | SearchStrategy[dict[str, int]] | None = None,
    init_lora_weights: bool | str | Sequence[bool | str] | SearchStrategy[bool | str] = _INIT_MODES,
    task_type: str | Sequence[str | None] | SearchStrategy[str | None] | None = "CAUSAL_LM",
    layers_to_transform: int | list[int] | SearchStrategy[Any] | None = None,
) -> SearchStrategy[Any]:
    """Strategy for `peft.LoraConfig`s that PEFT accepts and that attach to a Llama-style model.

    Every argument takes a value, a list of values to choose from, or a strategy. For `target_modules` (and
    `layers_to_transform`) a list of names (ints) is one value, as in `LoraConfig`; pass a list of such lists
    to choose. Defaults cover PEFT's option space: any rank up to 256 (common ones first), alpha at the usual
    ratios to r or chosen without looking at r, any non-empty subset of `LLAMA_TARGETS` or "all-linear", any
    dropout in [0, 1), every bias mode, rsLoRA on and off, some targets at another rank (`rank_pattern`), the
    data-free inits (True, False, "gaussian").

    `alpha` and `alpha_ratio` exclude each other: `alpha_ratio=2` gives lora_alpha = 2 * r, and the same ratio
    for every `rank_pattern` entry (through `alpha_pattern`). `rank_pattern=None` (default) draws one from the
    drawn target names, `{}` draws none. PEFT's cross-field rules hold: `layers_to_transform` is dropped when
    the targets are one string, "orthogonal" init gets even ranks only.

    Example:
        >>> @given(config=lora_configs(ranks=[4, 8, 16], alpha_ratio=2, target_modules=["q_proj", "v_proj"]))
        ... def test_budget(lora_adapters, config):
        ...     with lora_adapters.attached(config) as model:
        ...         assert_param_budget(model)
    """
    if alpha is not None and alpha_ratio is not None:
        raise InvalidArgument(
            f"alpha={alpha!r} and alpha_ratio={alpha_ratio!r}: pass one of them (alpha_ratio=2 means alpha = 2 * r)"
        )
    if alpha is not None:
        alpha_rule = _fixed_alpha(_strategy("alpha", alpha, _check_positive, is_value=_never_a_value))
    elif alpha_ratio is not None:
        alpha_rule = _ratio_alpha(_strategy("alpha_ratio", alpha_ratio, _check_positive, is_value=_never_a_value))
    else:
        alpha_rule = _default_alpha
    inits = _strategy(
        "init_lora_weights",
        init_lora_weights,
        _check_choice(_INITS, f"; not {_REFUSED_INITS}"),
        is_value=_never_a_value,
    )
    space = _Space(
        ranks=_strategy("ranks", ranks, _check_rank, is_value=_never_a_value),
        alpha=alpha_rule,
        target_modules=_strategy("target_modules", target_modules, _check_targets),
        dropout=_strategy("dropout", dropout, _check_dropout, is_value=_never_a_value),
        bias=_strategy("bias", bias, _check_choice(_BIASES), is_value=_never_a_value),
        use_rslora=_strategy("use_rslora", use_rslora, _check_bool, is_value=_never_a_value),
        rank_pattern=None
        if rank_pattern is None
        else _strategy("rank_pattern", rank_pattern, _check_rank_pattern, is_value=_never_a_value),
        init_lora_weights=inits,
        task_type=_strategy("task_type", task_type, _check_task_type, is_value=_never_a_value),
        layers_to_transform=_strategy(
            "layers_to_transform", layers_to_transform, _check_layers, is_value=_is_layer_list
        ),
    )
    _check_orthogonal_ranks(init_lora_weights, ranks)
    return _configs(space)


def _check_orthogonal_ranks(
    init_lora_weights: bool | str | Sequence[bool | str] | SearchStrategy[bool | str],
    ranks: int | Sequence[int] | SearchStrategy[int],
) -> None:
    """Orthogonal init only, with fixed ranks that are all odd: nothing PEFT accepts can be drawn.

    Called after `_strategy` checked both, so a fixed `ranks` is one integer or a list or tuple of them.
    """
    if isinstance(init_lora_weights, SearchStrategy) or isinstance(ranks, SearchStrategy):
        return
    inits = list(init_lora_weights) if isinstance(init_lora_weights, (list, tuple)) else [init_lora_weights]
    fixed = ranks if isinstance(ranks, Sequence) else [ranks]
    if inits == ["orthogonal"] and all(r % 2 for r in fixed):
        raise InvalidArgument(
            f"init_lora_weights='orthogonal' with ranks={ranks!r}: PEFT's orthogonal init needs an even rank"
        )


# --- the policy's space ---------------------------------------------------------------------------------------

_VIOLATIONS = ("rank", "alpha", "rslora", "dropout_high", "dropout_low", "missing_target", "forbidden_target")


def _violations(policy: Policy, free: Sequence[str]) -> list[str]:
    """The rules a config can break by a small step while staying a config PEFT accepts."""
    possible = {
        "rank": True,
        "alpha": policy.alpha_tolerance < 1,  # at a relative tolerance >= 1 every positive alpha is close
        "rslora": policy.rslora == "forbid",
        "dropout_high": math.nextafter(policy.max_dropout, 1) < 1,
        "dropout_low": policy.min_dropout > 0,
        "missing_target": bool(policy.required_targets) and (len(policy.required_targets) > 1 or bool(free)),
        "forbidden_target": bool(policy.forbidden_targets),
    }
    return [kind for kind in _VIOLATIONS if possible[kind]]


def _policy_alpha(policy: Policy, off: bool) -> _AlphaRule:
    """The policy's alpha (`Policy.expected_alpha`, rsLoRA rule included), anywhere within its tolerance;
    `off`: just outside the tolerance, above or below."""
    tolerance = policy.alpha_tolerance

    def expected(rank: int, use_rslora: bool) -> float:
        # Forbidden rsLoRA has no right alpha: the violating config keeps the plain ratio, as users write it.
        alpha = policy.expected_alpha(rank, use_rslora)
        return policy.expected_alpha(rank) if alpha is None else alpha  # type: ignore[return-value]

    def rule(draw: st.DrawFn, r: int, use_rslora: bool) -> tuple[float, Callable[[int], float]]:
        want = expected(r, use_rslora)
        if off:
            # |alpha - want| > tolerance * max(alpha, want) holds for want * ((1 + m) / (1 - tolerance)) ** ±1.
            factor = (1 + draw(st.floats(0.01, 1.0))) / (1 - tolerance)
            alpha = want * factor if draw(st.booleans()) else want / factor
        else:
            # Within the tolerance, and never near 0 or overflowing when the tolerance is huge.
            spread = min(tolerance, 1.0) / 2
            alpha = want * (1 + draw(st.floats(-spread, spread))) if spread else want
        return _number(alpha), lambda rank: _number(expected(rank, use_rslora))

    return rule


@st.composite
def _target_lists(draw: st.DrawFn, must: Sequence[str], free: Sequence[str]) -> list[str]:
    """`must` plus a subset of `free`, never empty."""
    extra = draw(st.lists(st.sampled_from(free), unique=True, min_size=0 if must else 1)) if free else []
    return sorted({*must, *extra})


@st.composite
def _policy_config(draw: st.DrawFn, policy: Policy, kinds: Sequence[str], free: Sequence[str]) -> Any:
    kind = draw(st.sampled_from(kinds)) if kinds else None
    required = list(policy.required_targets)
    if kind == "missing_target":
        required.remove(draw(st.sampled_from(required)))
    if kind == "forbidden_target":
        required.append(draw(st.sampled_from(policy.forbidden_targets)))
    if kind == "rank":
        allowed = set(policy.ranks)
        ranks = st.sampled_from(sorted({n for r in allowed for n in (r - 1, r + 1) if n >= 1} - allowed))
    else:
        ranks = st.sampled_from(policy.ranks)
    if kind == "dropout_high":
        dropout = st.floats(policy.max_dropout, 1.0, exclude_min=True, exclude_max=True)
    elif kind == "dropout_low":
        dropout = st.floats(0.0, policy.min_dropout, exclude_max=True)
    else:
        dropout = st.floats(policy.min_dropout, policy.max_dropout)
    rslora = st.just(True) if kind == "rslora" else st.just(False) if policy.rslora == "forbid" else st.booleans()
    space = _Space(
        ranks=ranks,
        alpha=_policy_alpha(policy, off=kind == "alpha"),
        target_modules=_target_lists(required, free),
        dropout=dropout,
        bias=st.just("none"),
        use_rslora=rslora,
        # Off-policy configs get no rank_pattern: one that covers every target would hide the violation.
        rank_pattern=None if kind is None else st.just({}),
        init_lora_weights=st.just(True),
        task_type=st.just("CAUSAL_LM"),
        layers_to_transform=st.none(),
    )
    return draw(_configs(space))


def policy_configs(
    policy: Policy, *, compliant: bool = True, target_modules: Collection[str] = LLAMA_TARGETS
) -> SearchStrategy[Any]:
    """Configs inside the team policy's space, or (`compliant=False`) just outside it.

    Inside: a rank from `policy.ranks` (also in `rank_pattern`), lora_alpha from `Policy.expected_alpha`
    (the rsLoRA rule included, anywhere within `alpha_tolerance`), every required target and none of the
    forbidden ones (the others drawn from `target_modules`), dropout within the policy's range.

    Outside: exactly one rule broken by a small step, still a config PEFT accepts: a rank next to an allowed
    one, alpha just outside the tolerance, rsLoRA where forbidden, dropout just off the range, a required
    target missing or a forbidden one added. Shrinking goes to the first of these that the policy allows
    (a neighbouring rank) on the fewest targets, so a counterexample is as small as it gets.

    The trainable-parameter budget depends on the model, not the config: choose a policy whose budget fits
    the model for the whole rank x targets space (see `assert_param_budget`).

    Example:
        >>> strict = Policy(ranks=(8, 16), required_targets=("q_proj", "v_proj"), forbidden_targets=("lm_head",))
        >>> @given(config=policy_configs(strict, compliant=False))
        ... def test_rejected(config):
        ...     with pytest.raises(LoraAssertionError):
        ...         assert_policy(config, strict)
    """
    if not isinstance(policy, Policy):
        raise InvalidArgument(f"policy={policy!r}: pass a pytest_lora.Policy (e.g. load_policy('policy.toml'))")
    _check_bool("compliant", compliant)
    names = _names("target_modules", target_modules)
    free = sorted(set(names) - {*policy.required_targets, *policy.forbidden_targets})
    if not free and not policy.required_targets:
        raise InvalidArgument(
            f"target_modules={names!r}: every name is forbidden by the policy ({policy.source}), "
            "so no config can target anything; add allowed module names"
        )
    kinds = [] if compliant else _violations(policy, free)
    return _policy_config(policy, kinds, free)


# --- values users get wrong -----------------------------------------------------------------------------------


class InvalidLoraValue(NamedTuple):
    """A config with exactly one wrong value: `field` is the LoraConfig field, `value` the offending value
    (for a misspelled target or an unmatched rank_pattern key: that name)."""

    field: str
    value: Any
    config: Any


@st.composite
def _misspelled(draw: st.DrawFn, names: Sequence[str]) -> str:
    """One edit (drop, change, insert or swap a letter) away from a real name, and not a real name."""
    return draw(st.sampled_from(typos(draw(st.sampled_from(names)), names)))


def typos(name: str, names: Collection[str] = ()) -> list[str]:
    """Every one-edit misspelling of `name` that is none of `names` nor a layer name of a common family:
    one edit turns q_proj into o_proj, a real layer even when the caller draws from a subset of them."""
    letters = string.ascii_lowercase + "_"
    edits = [name[:i] + name[i + 1 :] for i in range(len(name))]
    edits += [name[:i] + c + name[i + 1 :] for i in range(len(name)) for c in letters]
    edits += [name[:i] + c + name[i:] for i in range(len(name) + 1) for c in letters]
    edits += [name[:i] + name[i + 1] + name[i] + name[i + 2 :] for i in range(len(name) - 1)]
    real = {*names, *_COMMON_LAYERS, name}
    return [typo for typo in dict.fromkeys(edits) if typo and typo not in real] or [name + "s"]


_COMMON_LAYERS = frozenset(
    {*LLAMA_TARGETS, "qkv_proj", "gate_up_proj", "out_proj", "fc1", "fc2", "dense", "c_attn", "c_proj", "c_fc"}
    | {"query_key_value", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "gate", "lm_head", "embed_tokens"}
    | {"q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1", "query", "key", "value"}
)


_WRONG_SCALARS = {
    "r": st.integers(max_value=0) | st.floats() | st.sampled_from(["8", True]),
    "lora_alpha": st.integers(max_value=0) | st.floats(max_value=0.0) | st.just(math.nan),
    "lora_dropout": (st.floats() | st.integers()).filter(lambda x: not 0 <= x < 1),
}


@st.composite
def _invalid(draw: st.DrawFn, names: Sequence[str]) -> InvalidLoraValue:
    kind = draw(st.sampled_from([*_WRONG_SCALARS, "target_modules", "rank_pattern"]))
    space = _Space(
        ranks=st.integers(1, 64),
        alpha=_ratio_alpha(st.just(2)),
        target_modules=st.lists(st.sampled_from(names), min_size=1, unique=True),
        dropout=st.sampled_from([0.0, 0.05, 0.1]),
        bias=st.just("none"),
        use_rslora=st.booleans(),
        rank_pattern=st.just({}),
        init_lora_weights=st.just(True),
        task_type=st.just("CAUSAL_LM"),
        layers_to_transform=st.none(),
    )
    kwargs = draw(_config_kwargs(space))
    if kind in _WRONG_SCALARS:
        value = kwargs[kind] = draw(_WRONG_SCALARS[kind])
    elif kind == "target_modules" and draw(st.booleans()):
        value = kwargs[kind] = []
    elif kind == "target_modules":
        # The typo alone, or next to correct names (PEFT then adapts the others and says nothing).
        value = draw(_misspelled(names))
        kwargs[kind] = sorted({value, *(kwargs[kind] if draw(st.booleans()) else [])})
    else:
        untargeted = sorted(set(names) - set(kwargs["target_modules"]))
        typo = _misspelled(kwargs["target_modules"])
        value = draw(st.one_of(typo, st.sampled_from(untargeted)) if untargeted else typo)
        kwargs["rank_pattern"] = {value: kwargs["r"]}
    config = draw(_builds(kwargs))
    return draw(st.builds(InvalidLoraValue, field=st.just(kind), value=st.just(value), config=st.just(config)))


def invalid_lora_values(*, target_modules: Collection[str] = LLAMA_TARGETS) -> SearchStrategy[InvalidLoraValue]:
    """Configs with one value users get wrong, as `InvalidLoraValue(field, value, config)`.

    r <= 0 or not an int, lora_alpha <= 0 or NaN, lora_dropout outside [0, 1), an empty or misspelled
    `target_modules` entry (alone or next to correct ones: PEFT itself only fails when nothing matches), a
    `rank_pattern` key that matches no targeted module (a typo, or a module that is not targeted). The other
    fields are valid for a model that has `target_modules`, so the one wrong value is what must be refused.

    Example:
        >>> @given(bad=invalid_lora_values())
        ... def test_refused(lora_adapters, bad):
        ...     with pytest.raises(AdapterConfigError, match=bad.field):
        ...         lora_adapters.attach(bad.config)
    """
    return _invalid(_names("target_modules", target_modules))


# --- reporting ------------------------------------------------------------------------------------------------


def config_repr(config: Any) -> str:
    """`LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])`: the fields that differ from
    PEFT's defaults, as code that pastes back (sets as sorted lists, enums as their value).

    For `hypothesis.note(config_repr(config))`, or a failure message.
    """
    defaults = _defaults()
    names = [*_ALWAYS_SHOWN, "target_modules", *defaults]
    shown = [n for n in dict.fromkeys(names) if n in _ALWAYS_SHOWN or getattr(config, n) != defaults[n]]
    return f"{type(config).__name__}({', '.join(f'{n}={_code(getattr(config, n))}' for n in shown)})"


def _code(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, (set, frozenset)):
        return repr(sorted(value, key=repr))
    return repr(value)


register_profile()
