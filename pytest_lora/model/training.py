"""A short, deterministic LoRA training run, and the built-in learnable data.

The run is plain PyTorch (AdamW on the adapter parameters), so what it measures is the
model, not a trainer's machinery. It refuses to fall into the traps that make a LoRA run
silently dead (bitsandbytes' CPU repack, gradients that never reach the adapters) and stops
at the first non-finite loss, naming the step. The objective follows the model's task
(`objective`): the same token data trains a causal LM, a seq2seq LM or a classifier.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from pytest_lora.core.defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_STEPS
from pytest_lora.core.errors import TrainingError
from pytest_lora.core.values import is_int, is_real
from pytest_lora.model.loading import model_task, repacked_4bit_layers, unwrapped
from pytest_lora.model.measure import measure_peak

MAX_SEED = 2**63 - 1  # the largest --lora-seed (a TOML integer); torch's generators take 64 bits


@dataclass
class TokenData:
    """Train and validation token ids, `[n_sequences, seq_len]` int64 tensors.

    Labels, when given, are the same shape with -100 where no loss is taken (a prompt, padding);
    None: every token is a target (labels = input ids).
    """

    train: Any
    val: Any
    name: str
    train_labels: Any = None
    val_labels: Any = None

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.train, self.val, self.train_labels, self.val_labels):
            if tensor is not None:
                digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def synthetic_data(
    vocab_size: int, seq_len: int, *, seed: int = 0, n_train: int = 256, n_val: int = 64, noise: float = 0.1
) -> TokenData:
    """Learnable sequences: a seeded random successor map over 64 tokens, with 10% random tokens.

    A random-init model learns little from random tokens; here a LoRA on q/v of a frozen tiny
    model lowers the loss by ~10% in 40 steps, while a muted adapter (alpha far too small)
    stays flat, which is what the plateau checks need to tell apart. The noise keeps the
    sequences from being periodic and gives a held-out split something to generalize over.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    alphabet = torch.randperm(vocab_size, generator=gen)[: min(64, vocab_size)]
    successor = alphabet[torch.randint(0, len(alphabet), (vocab_size,), generator=gen)]
    n = n_train + n_val
    tokens = torch.empty(n, seq_len, dtype=torch.long)
    tokens[:, 0] = alphabet[torch.randint(0, len(alphabet), (n,), generator=gen)]
    for t in range(1, seq_len):
        random_tokens = alphabet[torch.randint(0, len(alphabet), (n,), generator=gen)]
        keep = torch.rand(n, generator=gen) >= noise
        tokens[:, t] = torch.where(keep, successor[tokens[:, t - 1]], random_tokens)
    return TokenData(tokens[:n_train], tokens[n_train:], f"synthetic(seed={seed}, vocab={vocab_size})")


def coerce_data(dataset: Any, *, seq_len: int, vocab_size: int, seed: int) -> TokenData:
    """Accept the built-in data (None), a tensor of ids, a `(train, val)` pair or dicts with `input_ids`.

    A tensor or list without a split is split 90/10 (at least one validation sequence).
    """
    import torch

    if dataset is None:
        return synthetic_data(vocab_size, seq_len, seed=seed)
    labels = (None, None)
    if isinstance(dataset, TokenData):
        train, val, name = dataset.train, dataset.val, dataset.name
        labels = (dataset.train_labels, dataset.val_labels)
    elif isinstance(dataset, tuple) and len(dataset) == 2:
        train, val = (_as_ids(part, seq_len) for part in dataset)
        name = "user (train, val)"
    else:
        ids = _as_ids(dataset, seq_len)
        n_val = max(1, len(ids) // 10)
        if len(ids) < 2:
            raise TrainingError(
                f"dataset: {len(ids)} sequence(s) of >= {seq_len} tokens; at least 2 are needed "
                "(one to train on, one held out).\n  fix: pass more data, or a shorter seq_len"
            )
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        train, val, name = ids[perm[n_val:]], ids[perm[:n_val]], f"user ({len(ids)} sequences)"
    for part_name, part in (("train", train), ("validation", val)):
        if len(part) == 0:
            raise TrainingError(f"dataset: the {part_name} split is empty.\n  fix: pass at least one sequence")
        low, high = int(part.min()), int(part.max())
        if low < 0 or high >= vocab_size:
            raise TrainingError(
                f"dataset: the {part_name} split has token ids in [{low}, {high}], but the model's vocabulary "
                f"is [0, {vocab_size - 1}].\n  fix: tokenize with the model's own tokenizer"
            )
    cut = (None if part is None else part[:, :seq_len] for part in labels)
    return TokenData(train[:, :seq_len], val[:, :seq_len], name, *cut)


def _as_ids(data: Any, seq_len: int) -> Any:
    import torch

    if isinstance(data, torch.Tensor):
        rows = data if data.dim() == 2 else data.reshape(-1, data.shape[-1])
    else:
        rows_list = []
        for item in data:
            ids = item["input_ids"] if isinstance(item, Mapping) else item
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
            if len(ids) >= seq_len:
                rows_list.append(ids[:seq_len])
        if not rows_list:
            raise TrainingError(
                f"dataset: no sequence has >= {seq_len} tokens (seq_len), so there is nothing to train on.\n"
                "  fix: pass longer sequences, or a smaller seq_len"
            )
        rows = torch.stack(rows_list)
    if rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise TrainingError(f"dataset: token ids must be integers, got {rows.dtype}.\n  fix: pass input_ids")
    if rows.shape[1] < seq_len:
        raise TrainingError(
            f"dataset: sequences have {rows.shape[1]} tokens, shorter than seq_len={seq_len}.\n"
            "  fix: pass longer sequences, or a smaller seq_len"
        )
    return rows.long()


@dataclass
class TrainResult:
    """What a short run measured. `losses[i]` is the train loss of step i+1."""

    losses: list[float]
    val_losses: list[float]
    val_steps: list[int]
    tokens_per_second: float
    samples_per_second: float
    step_time_s: float
    peak_memory_bytes: int
    peak_memory_scope: str
    model: Any
    changed_lora: list[str]
    unchanged_lora: list[str]
    base_unchanged: bool
    steps: int
    seed: int
    lr: float
    batch_size: int
    seq_len: int
    device: str
    data_name: str
    data_fingerprint: str
    config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _frozen_state(model: Any) -> dict[str, tuple[int, int | str]]:
    """Each frozen tensor's storage and write count; one PEFT parametrizes (`target_parameters`) by its bytes."""
    from pytest_lora.model.adapters import parametrized_targets, tensor_digest

    wrapped = {id(param) for param in parametrized_targets(model)}
    return {
        name: (param.data_ptr(), tensor_digest(param) if id(param) in wrapped else param._version)
        for name, param in model.named_parameters()
        if not param.requires_grad
    }


def device_of(model: Any) -> str:
    for param in model.parameters():
        return str(param.device)
    return "cpu"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def guard_cpu_repack(model: Any) -> None:
    """Refuse a model whose 4-bit layers were already repacked, and keep the rest from repacking."""
    repacked = repacked_4bit_layers(model)
    if repacked:
        raise TrainingError(
            f"{len(repacked)} bitsandbytes 4-bit layer(s) (e.g. {repacked[0]}) were repacked for CPU inference: "
            "an earlier evaluation (eval mode + torch.no_grad) on this base switched them to gemv_4bit, which "
            "has no autograd kernel, so LoRA training on this model would silently learn nothing.\n"
            "  fix: set `module.support_avx512bf16_for_cpu = False` on every Linear4bit right after loading "
            "(pytest-lora's base-model fixtures do), then reload the model"
        )
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _lora_params(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _check_gradients(trainable: Mapping[str, Any], step: int) -> None:
    """lora_B must get gradients on step 1, lora_A from step 2 on (lora_B starts at zero)."""
    kind = "lora_B" if step == 1 else "lora_A"
    watched = {n: p for n, p in trainable.items() if f"{kind}." in n}
    dead = [n for n, p in watched.items() if p.grad is None or not bool((p.grad != 0).any())]
    if watched and len(dead) == len(watched):
        raise TrainingError(
            f"no gradient reaches the adapters: all {len(watched)} {kind} tensors have zero gradient at step {step}.\n"
            "  this run would report a flat loss and blame the rank, but the adapters are simply not trained.\n"
            "  causes: a 4-bit base repacked for CPU inference (bitsandbytes gemv_4bit has no backward), "
            "adapters disabled, the adapted modules not on the loss path, or an effective scaling "
            "(lora_alpha / r) so large that activations saturate.\n"
            "  fix: load the base with pytest-lora's fixtures (they disable the repack), and check target_modules"
        )


Objective = Callable[..., dict[str, Any]]  # (token ids, labels or None) -> the forward's keywords


def objective(model: Any) -> Objective:
    """The forward keywords for a batch of token ids `[b, seq_len]`, by the model's task.

    - causal LM: the sequence is its own labels (the model shifts them);
    - seq2seq LM: the encoder reads the first half, the decoder is trained to write the second half; with
      prompt/response labels, the encoder reads the row with its responses blanked (pad) and the decoder
      writes the responses, the loss on them only;
    - classification: labels are a deterministic function of the tokens, learnable by attention. A
      token's vocabulary bin is `id * num_labels // vocab_size`; a token is labelled with its bin, a
      sequence with the mean bin of its tokens, rounded (with 2 labels: are most tokens in the upper
      half of the vocabulary?). One label is a regression on the share of upper-half tokens; a
      multi-label model gets the class one-hot.
    """
    task = model_task(model)
    config = unwrapped(model).config
    classes, vocab = int(config.num_labels), int(config.vocab_size)
    problem = getattr(config, "problem_type", None)
    blank = getattr(config, "pad_token_id", None) or 0

    def inputs(batch: Any, labels: Any = None) -> dict[str, Any]:
        import torch

        if task == "CAUSAL_LM":  # text data brings its own labels: -100 where no loss is taken (prompts)
            return {"input_ids": batch, "labels": batch if labels is None else labels}
        if task == "SEQ_2_SEQ_LM":
            if labels is not None:  # prompt/response rows: the encoder reads the prompts, responses blanked
                return {"input_ids": torch.where(labels == -100, batch, blank), "labels": labels}
            source, target = batch.tensor_split(2, dim=1)
            return {"input_ids": source.contiguous(), "labels": target.contiguous()}
        bins = batch * classes // vocab
        if task == "TOKEN_CLS":
            return {"input_ids": batch, "labels": bins}
        if classes == 1 or problem == "regression":
            return {"input_ids": batch, "labels": (batch * 2 // vocab).float().mean(1)}
        labels = bins.float().mean(1).round().long()
        if problem == "multi_label_classification":
            labels = torch.nn.functional.one_hot(labels, classes).float()
        return {"input_ids": batch, "labels": labels}

    return inputs


def _loss_weight(task: str, labels: Any) -> int:
    """How many targets a batch's mean loss averages over: labelled tokens (a causal LM predicts from the
    second on), else sequences. Weighting by it makes a split's loss the mean per target."""
    if task == "CAUSAL_LM":
        return int((labels[:, 1:] != -100).sum())
    if task in ("SEQ_2_SEQ_LM", "TOKEN_CLS"):
        return int((labels != -100).sum())
    return len(labels)


def forward_loss(model: Any, batch: Mapping[str, Any], step: int | None = None) -> Any:
    """The loss of one batch (`objective`'s keywords); a forward that rejects them is a TrainingError with the fix."""
    try:
        return model(**batch).loss
    except ValueError as exc:
        fix = "check that the checkpoint suits its task (see Models in the README), or pass task= to load another"
        if "padding token" in str(exc):
            fix = (
                "a decoder classifier reads the last non-padding token, so its config needs pad_token_id: "
                "set it where the model is saved (e.g. to the tokenizer's pad or eos id)"
            )
        name, task = type(unwrapped(model)).__name__, model_task(model)
        raise TrainingError(
            f"{f'step {step}' if step else 'evaluation'}: {name} ({task}) rejected the objective's inputs: {exc}\n"
            f"  fix: {fix}"
        ) from exc


def adamw(params: Sequence[Any], *, lr: float, weight_decay: float = 0.0) -> Any:
    """The optimizer of every pytest-lora run (`lora_train`, `lora_benchmark`, the sweep): torch AdamW."""
    import torch

    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)


def training_step(
    model: Any,
    optimizer: Any,
    batch: Mapping[str, Any],
    step: int | None = None,
    before_update: Callable[[Any], None] | None = None,
) -> Any:
    """One training step: forward, backward, `before_update(loss)` (checks), the optimizer's update, gradients
    cleared. Returns the loss detached, so no graph outlives the step."""
    loss = forward_loss(model, batch, step)
    loss.backward()
    if before_update is not None:
        before_update(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@contextmanager
def qlora_recipe(model: Any) -> Iterator[None]:
    """What `prepare_model_for_kbit_training` does, for one run on the shared base, undone afterwards.

    16-bit weights outside the 4-bit layers upcast to fp32, gradient checkpointing (non-reentrant,
    as PEFT now recommends), gradients on the input embeddings, `use_cache` off. The base is
    shared by every test, so the state before the run is put back when it ends, even on failure.
    """
    import torch

    from pytest_lora.model.base_state import BaseState

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise TrainingError(
            f"gradient_checkpointing=True, but {type(inner).__name__} does not support gradient checkpointing.\n"
            "  fix: drop gradient_checkpointing for this model (its memory estimate then keeps every activation)"
        )
    state = BaseState.take(inner)
    try:
        if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
            quantized = ("Params4bit", "Int8Params")
            for param in inner.parameters():
                half = param.dtype in (torch.float16, torch.bfloat16)
                if half and not param.requires_grad and type(param).__name__ not in quantized:
                    param.data = param.data.float()
        inner.config.use_cache = False
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inner.enable_input_require_grads()
        yield
    finally:
        state.restore(inner)


def _mean_loss(model: Any, data: Any, batch_size: int, device: str, labels: Any = None) -> float:
    """The loss per target token over `data` (labels: -100 where no loss is taken; None: the ids)."""
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    inputs, task = objective(model), model_task(model)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size].to(device)
            kwargs = inputs(batch, None if labels is None else labels[start : start + batch_size].to(device))
            weight = _loss_weight(task, kwargs["labels"])
            total += float(forward_loss(model, kwargs)) * weight
            count += weight
    model.train(was_training)
    return total / count


def train(
    model: Any,
    data: TokenData,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    eval_every: int | None = None,
    weight_decay: float = 0.0,
    gradient_checkpointing: bool = False,
) -> TrainResult:
    """Train the model's trainable (adapter) parameters for `steps` AdamW steps on `data.train`.

    Deterministic on the CPU: the seed fixes batch order and dropout; the global RNG is left as
    it was. Validation loss is measured every `eval_every` steps (default: 8 times per run) and
    after the last step. `gradient_checkpointing` runs under `qlora_recipe`.
    """
    import torch

    check_run_args(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        n_train=len(data.train),
        seed=seed,
        weight_decay=weight_decay,
        eval_every=eval_every,
    )
    with qlora_recipe(model) if gradient_checkpointing else nullcontext():
        device = device_of(model)
        guard_cpu_repack(model)
        trainable = _lora_params(model)
        if not trainable:
            raise TrainingError(
                "the model has no trainable parameters, so there is nothing to train.\n"
                "  fix: pass a PeftModel (lora_model(config)) or a LoraConfig to lora_train"
            )
        base_state = _frozen_state(model)
        before = {n: p.detach().clone() for n, p in trainable.items()}
        eval_every = eval_every or max(1, steps // 8)
        inputs = objective(model)
        optimizer = adamw(list(trainable.values()), lr=lr, weight_decay=weight_decay)
        losses: list[float] = []

        def checks(step: int) -> Callable[[Any], None]:
            """Before the update: a non-finite loss stops the run, and the first steps' gradients must flow."""

            def check(loss: Any) -> None:
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingError(
                        f"loss is {value} at step {step} of {steps} (lr={lr}); the last finite losses were "
                        f"{[round(v, 4) for v in losses[-3:]]}.\n"
                        "  causes: learning rate too high, lora_alpha far larger than 2*r, or fp16 overflow.\n"
                        "  fix: lower lr (e.g. / 10), keep lora_alpha = 2*r, use bfloat16 compute"
                    )
                if step <= 2:
                    _check_gradients(trainable, step)

            return check

        val_losses: list[float] = []
        val_steps: list[int] = []
        train_seconds = 0.0
        with torch.random.fork_rng(devices=[]), measure_peak(device) as peak, warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*silently incorrect.*")
            torch.manual_seed(seed)
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
            model.train()
            for step in range(1, steps + 1):
                rows = order[torch.arange((step - 1) * batch_size, step * batch_size) % len(order)]
                batch = data.train[rows].to(device)
                labels = None if data.train_labels is None else data.train_labels[rows].to(device)
                sync(device)
                started = time.perf_counter()
                try:
                    loss = training_step(model, optimizer, inputs(batch, labels), step, before_update=checks(step))
                except UserWarning as exc:
                    raise TrainingError(
                        f"step {step}: PyTorch warned of silently incorrect gradients ({exc}); "
                        "the adapters would not learn.\n  fix: see the 4-bit CPU repack note in the README"
                    ) from None
                value = loss.item()
                sync(device)
                train_seconds += time.perf_counter() - started
                losses.append(value)
                if step % eval_every == 0 or step == steps:
                    val_losses.append(_mean_loss(model, data.val, batch_size, device, data.val_labels))
                    val_steps.append(step)
            model.eval()
        changed = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
        tokens = steps * batch_size * data.train.shape[1]
        return TrainResult(
            losses=losses,
            val_losses=val_losses,
            val_steps=val_steps,
            tokens_per_second=tokens / train_seconds if train_seconds else math.inf,
            samples_per_second=steps * batch_size / train_seconds if train_seconds else math.inf,
            step_time_s=train_seconds / steps,
            peak_memory_bytes=peak.bytes,
            peak_memory_scope=peak.scope,
            model=model,
            changed_lora=changed,
            unchanged_lora=[n for n in trainable if n not in changed],
            base_unchanged=_frozen_state(model) == base_state,
            steps=steps,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
            seq_len=int(data.train.shape[1]),
            device=device,
            data_name=data.name,
            data_fingerprint=data.fingerprint,
            config=getattr(model, "peft_config", {}).get("default"),
        )


def check_run_args(
    *,
    steps: int,
    lr: float,
    batch_size: int,
    n_train: int,
    seed: int = 0,
    weight_decay: float = 0.0,
    eval_every: int | None = None,
) -> None:
    """Refuse run arguments that would crash deep in torch or train silently wrong; one message lists them all."""
    problems = []
    if not is_int(steps) or steps < 1:
        problems.append(f"steps={steps!r}: must be an int >= 1")
    if not is_real(lr) or not (0 < lr < math.inf):
        problems.append(f"lr={lr!r}: must be a finite number > 0 (e.g. 1e-3)")
    if not is_int(batch_size) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r}: must be an int >= 1")
    elif batch_size > n_train:
        problems.append(f"batch_size={batch_size}: larger than the {n_train} training sequence(s); pass more data")
    if not is_real(weight_decay) or not (0 <= weight_decay < math.inf):
        problems.append(f"weight_decay={weight_decay!r}: must be a finite number >= 0 (e.g. 0.01)")
    if eval_every is not None and (not is_int(eval_every) or eval_every < 1):
        problems.append(f"eval_every={eval_every!r}: must be an int >= 1, or None (8 evaluations per run)")
    problem = _seed_problem(seed)
    if problem:
        problems.append(problem)
    if problems:
        raise TrainingError("lora_train: " + "; ".join(problems))


def _seed_problem(seed: int) -> str | None:
    """A seed torch cannot take (its generators hold 64 bits) or --lora-seed would refuse, in words; None if fine."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        return f"seed={seed!r}: must be an int in [0, 2**63 - 1], as --lora-seed (e.g. 0)"
    return None


def model_data(model: Any, dataset: Any, *, seq_len: int, seed: int) -> TokenData:
    """The data for a run on `model` (a base or a PeftModel): seq_len checked against its context, ids
    against its vocabulary; text (a file, a Hugging Face dataset) tokenized with the model's tokenizer."""
    from pytest_lora.model import data as text_data

    check_seq_len(seq_len, model)
    problem = _seed_problem(seed)  # the data split and the synthetic data are seeded before any step runs
    if problem:
        raise TrainingError(f"lora_train: {problem}")
    if text_data.is_text_source(dataset):
        dataset = text_data.load(dataset, model=model, seq_len=seq_len, seed=seed)
    elif isinstance(dataset, str):
        return _builtin_data(model, dataset, seq_len=seq_len, seed=seed)
    return coerce_data(dataset, seq_len=seq_len, vocab_size=model.config.vocab_size, seed=seed)


def _builtin_data(model: Any, name: str, *, seq_len: int, seed: int) -> TokenData:
    """`builtin:planted-rank-K`, sampled from the base (the adapter switched off, so the teacher is the base)."""
    from pytest_lora.model import planted

    rank = planted.planted_rank(name)
    if rank is None:
        raise TrainingError(
            f"dataset = {name!r}: no such built-in dataset; the built-in one is "
            f"'{planted.PLANTED_PREFIX}K' (K >= 1).\n  fix: e.g. dataset={planted.DEFAULT_DATASET!r}, "
            "or a path to your own .jsonl / .json / .txt / .parquet"
        )
    disabled = getattr(model, "disable_adapter", None)
    with disabled() if callable(disabled) else nullcontext():
        return planted.planted_data(unwrapped(model), rank, seq_len=seq_len, seed=seed)


def check_seq_len(seq_len: int, model: Any) -> None:
    """seq_len must fit the model's context: longer positions are out of its training range."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not is_int(seq_len) or seq_len < 2:
        raise TrainingError(f"lora_train: seq_len={seq_len!r}: must be an int >= 2")
    if limit is not None and seq_len > limit:
        raise TrainingError(
            f"lora_train: seq_len={seq_len} is longer than the model's context "
            f"(max_position_embeddings={limit}).\n  fix: seq_len <= {limit}"
        )


def summarize_losses(values: Sequence[float]) -> str:
    """`5.512 -> 4.871 (-11.6%)` for messages and reports."""
    if not values:
        return "(no losses)"
    start, end = values[0], values[-1]
    change = (end - start) / abs(start) * 100 if start else 0.0
    return f"{start:.4f} -> {end:.4f} ({change:+.1f}%)"


def device_name(device: str) -> str | None:
    """The GPU's name (for the peak FLOP/s table); None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(device)


def timed_rounds(
    benchmark: Any,
    model: Any,
    data: TokenData,
    *,
    batch_size: int,
    steps_per_round: int,
    rounds: int,
    warmup_rounds: int,
    lr: float,
    seed: int,
    device: str,
    on_round: Callable[[int, float], None] = lambda index, seconds: None,
) -> tuple[list[float], int, str]:
    """Run the benchmark; return (seconds of each timed round, peak memory bytes, peak scope). `on_round(index,
    seconds)` is told of each round as it ends (warm-up rounds included), for progress. Batches are cut once
    and kept on the device, as a prefetching data loader would have them, so a round times the step alone.
    Each round ends with a CUDA synchronize: its time is the GPU's work.
    """
    import torch

    guard_cpu_repack(model)
    optimizer = adamw([param for param in model.parameters() if param.requires_grad], lr=lr)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    count = max(1, len(data.train) // batch_size)
    inputs = objective(model)
    labels = data.train_labels
    batches = [
        inputs(
            data.train[order[i * batch_size : (i + 1) * batch_size]].to(device),
            None if labels is None else labels[order[i * batch_size : (i + 1) * batch_size]].to(device),
        )
        for i in range(count)
    ]
    step_index = itertools.count()
    seconds: list[float] = []
    last_loss: list[Any] = []

    def one_round() -> None:
        start = time.perf_counter()
        for _ in range(steps_per_round):
            # the step returns the loss detached: a graph kept alive into the next forward costs ~2% on the tiny model
            last_loss[:] = [training_step(model, optimizer, batches[next(step_index) % count])]
        sync(device)
        seconds.append(time.perf_counter() - start)
        on_round(len(seconds), seconds[-1])

    model.train()
    sync(device)
    with measure_peak(device) as peak:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    value = float(last_loss[0])
    if not math.isfinite(value):
        raise TrainingError(
            f"lora_benchmark: the loss became {value} after {next(step_index)} steps (lr={lr}), so the timing "
            "measured a diverged run.\n  fix: lower lr (e.g. / 10), keep lora_alpha = 2*r"
        )
    timed = seconds if benchmark.disabled else seconds[-rounds:]
    scope = "cuda max_memory_allocated" if device.startswith("cuda") else f"process peak ({peak.scope})"
    return timed, peak.bytes, scope
