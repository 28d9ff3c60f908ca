"""A task whose right rank is known: text from the base model plus a planted rank-k update of its output head.

The teacher is the session's own base model (4-bit included, its weights untouched) with a fixed
rank-k update added to its output head: `logits = head(h) + s * U (V^T h)`, where V (input side) and
U (output side, on a 64-token alphabet) have k orthonormal columns drawn from a seeded generator, and
s puts each planted direction at `STRENGTH` times the RMS of the head's input along it. Sequences are
sampled from the teacher at temperature 1. A LoRA adapter of rank r >= k on the head can represent the
update exactly; one of rank r < k cannot (`BA - sUV^T` keeps rank >= k - r), so its validation loss
stays above the teacher's own (the floor) however long it trains. A sweep on this data must choose
r = k: a calibration of the whole pipeline (model, quantization, device, training budget, the rule).

Why the head: on a random-init base such as the built-in tiny Llama, the final norm and the 0.02-init
head bound the logits (about 3.7 in norm over 256 tokens), so no update of q/v or any inner layer can
move the output distribution by more than a few tenths of a nat and the rank would not show. An
update of the head sharpens it freely (teacher loss about 2 nats against 5.5 for the base).
torch is imported inside the functions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from pytest_lora.core.errors import AdapterConfigError, TrainingError
from pytest_lora.core.policy import PLANTED_PREFIX, planted_rank_of
from pytest_lora.core.values import is_int
from pytest_lora.model.training import TokenData

DEFAULT_PLANTED_RANK = 8
DEFAULT_DATASET = f"{PLANTED_PREFIX}{DEFAULT_PLANTED_RANK}"
# Sized for a sweep (each rank trains on all of it: the policy's data_fraction does not apply), in tokens so
# that a shorter seq_len gets more sequences: 512 x 32 tokens to train on, 64 x 32 held out.
TRAIN_TOKENS = 16_384
VAL_TOKENS = 2_048
ALPHABET = 64  # the update moves these tokens only: the task stays as sharp on a 32k vocabulary as on 256
STRENGTH = 10.0  # singular value of each planted direction, in units of the head input's RMS along it
_cache: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], PlantedData]] = weakref.WeakKeyDictionary()


@dataclass(kw_only=True)  # after TokenData's optional fields, by name only
class PlantedData(TokenData):
    """Token data sampled from the planted teacher, with what the teacher knows about it.

    `floor` is the teacher's own validation loss: no student does better on average, a student of
    rank >= `rank` on `head` can reach it, one below cannot. `base_loss`: the base's validation loss.
    """

    rank: int = 0
    head: str = ""
    floor: float = 0.0
    base_loss: float = 0.0

    def excess(self, losses: list[float]) -> list[float]:
        """Validation losses minus the floor: what `assert_no_plateau` judges for "plateaus above the floor"."""
        return [loss - self.floor for loss in losses]


def planted_rank(dataset: Any) -> int | None:
    """The k of `builtin:planted-rank-K`, None for anything else; a malformed K is a TrainingError."""
    if not isinstance(dataset, str):
        return None
    try:
        return planted_rank_of(dataset)
    except ValueError:
        raise TrainingError(
            f"dataset = {dataset!r}: the planted rank must be an int >= 1.\n  fix: e.g. {DEFAULT_DATASET!r}"
        ) from None


def planted_data(
    model: Any,
    rank: int = DEFAULT_PLANTED_RANK,
    *,
    seq_len: int = 64,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
) -> PlantedData:
    """Sequences of `seq_len` tokens sampled from `model` plus a planted rank-`rank` update of its head.

    `model` is a frozen base model without an adapter; its weights are not touched. `n_train` / `n_val`
    default to `TRAIN_TOKENS` / `VAL_TOKENS` worth of sequences. The same seed plants the same update
    whatever the sizes. Cached per model, so the ranks of a sweep share one dataset; deterministic for
    a given model, seed and thread count.
    """
    if not is_int(rank) or rank < 1:
        raise TrainingError(f"planted_data: rank={rank!r}: the planted rank must be an int >= 1 (e.g. 8)")
    n_train = n_train or -(-TRAIN_TOKENS // seq_len)
    n_val = n_val or -(-VAL_TOKENS // seq_len)
    cache = _cache.setdefault(model, {})
    key = (rank, seq_len, seed, n_train, n_val)
    if key not in cache:
        cache[key] = _generate(model, rank, seq_len, seed, n_train, n_val)
    return cache[key]


def head_name(model: Any) -> str:
    """The module name of the output head (`lm_head` on Llama): where the update is planted."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def check_targets(data: PlantedData, adapted: list[str]) -> None:
    """A planted sweep must adapt the head: no other LoRA can fit the update, so the answer would be wrong."""
    if data.head in adapted:
        return
    shown = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in adapted})) or "nothing"
    raise AdapterConfigError(
        f"dataset {data.name}: the planted rank-{data.rank} update is on the output head '{data.head}', but the "
        f"config adapts {shown}; no rank of these adapters can fit it, so the sweep could not find r={data.rank}.\n"
        f"  fix: add '{data.head}' to target_modules for the calibration, or pass your own dataset="
    )


def _generate(model: Any, rank: int, seq_len: int, seed: int, n_train: int, n_val: int) -> PlantedData:
    import torch

    from pytest_lora.model.loading import model_task
    from pytest_lora.model.training import guard_cpu_repack

    guard_cpu_repack(model)
    task = model_task(model)
    if task != "CAUSAL_LM":
        raise TrainingError(
            f"dataset {PLANTED_PREFIX}{rank}: planted data is sampled from a causal LM's output head, and "
            f"{type(model).__name__} is a {task} model.\n"
            "  fix: pass your own dataset= (a file, a Hugging Face dataset, token ids) for this model"
        )
    head = model.get_output_embeddings()
    hidden, vocab = int(head.in_features), int(head.out_features)
    alphabet_size = min(ALPHABET, vocab)
    if rank > min(hidden, alphabet_size):
        raise TrainingError(
            f"dataset {PLANTED_PREFIX}{rank}: rank {rank} is larger than the head allows (input size {hidden}, "
            f"{alphabet_size} planted tokens).\n  fix: a planted rank <= {min(hidden, alphabet_size)}"
        )
    gen = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(hidden, rank, generator=gen, dtype=torch.float64))[0]
    alphabet = torch.randperm(vocab, generator=gen)[:alphabet_size]
    u = torch.zeros(vocab, rank, dtype=torch.float64)
    u[alphabet] = torch.linalg.qr(torch.randn(alphabet_size, rank, generator=gen, dtype=torch.float64))[0]
    device = head.weight.device
    probe = alphabet[torch.randint(0, alphabet_size, (16, seq_len), generator=gen)]
    first = alphabet[torch.randint(0, alphabet_size, (n_train + n_val, 1), generator=gen)]
    with torch.no_grad():
        update = _Update(u, v, _head_input_rms(model, head, probe.to(device), v), device)
        handle = head.register_forward_hook(update)
        try:
            tokens = _sample(model, first.to(device), seq_len, gen)
            val = tokens[n_train:].to(device)
            floor = float(model(input_ids=val, labels=val).loss)
            update.enabled = False
            base_loss = float(model(input_ids=val, labels=val).loss)
        finally:
            handle.remove()
    name = head_name(model)
    label = f"{PLANTED_PREFIX}{rank} (seed {seed}: base + a rank-{rank} update of {name})"
    return PlantedData(
        tokens[:n_train], tokens[n_train:], label, rank=rank, head=name, floor=floor, base_loss=base_loss
    )


def _head_input_rms(model: Any, head: Any, probe: Any, v: Any) -> float:
    """RMS of the head's input along the planted directions, on a probe batch: the update's unit."""
    captured: list[Any] = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        model(input_ids=probe)
    finally:
        handle.remove()
    return float((captured[0].double() @ v.to(captured[0].device)).pow(2).mean().sqrt())


class _Update:
    """The planted update as a forward hook on the head: `output + s * U (V^T h)`."""

    def __init__(self, u: Any, v: Any, rms: float, device: Any) -> None:
        import torch

        self.u = u.to(device=device, dtype=torch.float32)
        self.v = v.to(device=device, dtype=torch.float32)
        self.scale = STRENGTH / max(rms, 1e-12)
        self.enabled = True

    def __call__(self, module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
        if not self.enabled:
            return output
        h = inputs[0].to(self.v.dtype)
        return output + (self.scale * (h @ self.v) @ self.u.T).to(output.dtype)


def _sample(model: Any, first: Any, seq_len: int, gen: Any) -> Any:
    """Ancestral sampling at temperature 1 with the KV cache (`cache` in transformers 5, `past_key_values` in 4)."""
    import inspect

    import torch

    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = [first.cpu()]
    step, state = first, None
    for _ in range(seq_len - 1):
        out = model(input_ids=step, use_cache=True, **({keyword: state} if state is not None else {}))
        state = getattr(out, keyword)
        probs = torch.softmax(out.logits[:, -1].double().cpu(), dim=-1)
        tokens.append(torch.multinomial(probs, 1, generator=gen))
        step = tokens[-1].to(first.device)
    return torch.cat(tokens, dim=1)
