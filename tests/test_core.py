"""The core path on real parts: the 4-bit tiny base, PEFT adapters, training, the assertions."""

from __future__ import annotations

import math

import pytest
from conftest import lora_config

from pytest_lora import (
    AdapterConfigError,
    LoraAssertionError,
    TrainingError,
    assert_adapter_shapes,
    assert_alpha_ratio,
    assert_no_overfit,
    assert_no_plateau,
    assert_param_budget,
    count_parameters,
)

pytestmark = pytest.mark.lora


def test_base_is_4bit_nf4_and_frozen(lora_base_model):
    import bitsandbytes as bnb

    linears = {n: m for n, m in lora_base_model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    layer = next(iter(linears.values()))
    assert layer.weight.quant_state.quant_type == "nf4"
    assert not any(p.requires_grad for p in lora_base_model.parameters())
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in lora_base_model.modules())


@pytest.mark.parametrize("r", [4, 8, 16])
def test_count_equals_peft(lora_model, r):
    model = lora_model(lora_config(r))
    count = count_parameters(model)
    assert (count.trainable, count.total) == model.get_nb_trainable_parameters()
    naive = sum(p.numel() for p in model.parameters())
    assert count.total > naive  # the packed 4-bit weights count twice per byte
    # r * (in + out) per module: q_proj 64 -> 64, v_proj 64 -> 32, on 4 layers
    assert count.trainable == 4 * r * ((64 + 64) + (64 + 32))


def test_adapter_is_removed_and_base_restored(lora_session, lora_model):
    manager = lora_session.manager()
    model = lora_model(lora_config(8, modules_to_save=["lm_head"]))
    assert {change.kind for change in manager.clean.changes(manager.base)} == {"adapter"}
    assert count_parameters(model).trainable > 0
    manager.detach()
    assert manager.clean.changes(manager.base) == []
    assert not hasattr(manager.base, "peft_config")


def test_second_attach_replaces_the_first(lora_model):
    first = lora_model(lora_config(4))
    second = lora_model(lora_config(16))
    assert count_parameters(second).trainable == 4 * 16 * 224
    assert first.get_base_model() is second.get_base_model()
    ranks = {m.r["default"] for m in second.modules() if hasattr(m, "lora_A") and "default" in m.r}
    assert ranks == {16}


def test_target_typo_names_the_entry_and_the_modules(lora_model):
    with pytest.raises(AdapterConfigError) as info:
        lora_model(lora_config(8, target_modules=["q_proj", "v_prj"]))
    message = str(info.value)
    assert "'v_prj' matches no module" in message
    assert "Did you mean 'v_proj'?" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message


def test_rank_pattern_key_matching_nothing_fails(lora_model):
    with pytest.raises(AdapterConfigError, match="rank_pattern entry 'q_prj'"):
        lora_model(lora_config(8, rank_pattern={"q_prj": 16}))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("r", 0, "r = 0"), ("lora_alpha", -1, "lora_alpha = -1"), ("lora_dropout", 1.5, "lora_dropout = 1.5")],
)
def test_bad_values_are_refused_before_peft(lora_model, field, value, expected):
    config = lora_config(8)
    setattr(config, field, value)
    with pytest.raises(AdapterConfigError, match=expected):
        lora_model(config)


def test_training_is_deterministic_bit_for_bit(lora_train):
    first = lora_train(lora_config(8, lora_dropout=0.1), steps=6)
    second = lora_train(lora_config(8, lora_dropout=0.1), steps=6)
    other_seed = lora_train(lora_config(8, lora_dropout=0.1), steps=6, seed=1)
    assert first.losses == second.losses
    assert first.val_losses == second.val_losses
    assert other_seed.losses != first.losses


def test_train_result_reports_what_changed(lora_train):
    result = lora_train(lora_config(8), steps=3, eval_every=1)
    assert len(result.losses) == 3 and result.val_steps == [1, 2, 3]
    assert result.base_unchanged
    assert any("lora_A" in n for n in result.changed_lora) and any("lora_B" in n for n in result.changed_lora)
    assert not result.unchanged_lora
    assert result.tokens_per_second > 0 and result.peak_memory_bytes > 0
    assert result.config.r == 8
    assert_adapter_shapes(result.model)


def test_one_step_moves_only_lora_b(lora_train):
    """With the default init lora_B starts at zero, so lora_A gets no gradient on step 1."""
    result = lora_train(lora_config(8), steps=1)
    assert result.changed_lora and all("lora_B" in n for n in result.changed_lora)
    assert all("lora_A" in n for n in result.unchanged_lora)


def test_sound_config_learns_and_passes_plateau(lora_train):
    result = lora_train(lora_config(8), steps=40)
    assert_no_plateau(result)
    assert result.losses[-1] < result.losses[0] * 0.95


def test_alpha_far_too_small_stays_flat_and_fails(lora_train):
    result = lora_train(lora_config(8, alpha=0.001), steps=40)
    with pytest.raises(LoraAssertionError) as info:
        assert_no_plateau(result)
    message = str(info.value)
    assert "plateau" in message and "effective scaling 0.000125" in message
    assert "raise r 2x" in message


def test_nan_loss_stops_the_run_naming_the_step(lora_model, lora_train):
    model = lora_model(lora_config(8))
    calls = []

    def poison_third_step(module, inputs, output):
        calls.append(module.training)
        return output * float("nan") if calls.count(True) == 3 and module.training else output

    handle = model.get_base_model().lm_head.register_forward_hook(poison_third_step)
    try:
        with pytest.raises(TrainingError, match=r"loss is nan at step 3 of 30 \(lr=0.01\)"):
            lora_train(model, steps=30)
    finally:
        handle.remove()


def test_seq_len_longer_than_context_is_refused(lora_train):
    with pytest.raises(TrainingError, match="max_position_embeddings=256"):
        lora_train(lora_config(8), seq_len=512)


def test_user_dataset_of_dicts(lora_train):
    import torch

    ids = torch.arange(40 * 16).reshape(40, 16) % 256
    data = [{"input_ids": row.tolist()} for row in ids]
    result = lora_train(lora_config(4), steps=3, seq_len=16, dataset=data, batch_size=4)
    assert result.data_name == "user (40 sequences)" and len(result.losses) == 3


def test_too_short_dataset_is_refused(lora_train):
    import torch

    with pytest.raises(TrainingError, match="shorter than seq_len=64"):
        lora_train(lora_config(4), dataset=torch.zeros(10, 8, dtype=torch.long))


def test_budget_message_is_a_diagnosis(lora_model):
    model = lora_model(lora_config(8))
    with pytest.raises(LoraAssertionError) as info:
        assert_param_budget(model, min_pct=5.0, max_pct=10.0)
    lines = str(info.value).splitlines()
    assert lines[0] == "LoRA parameter budget not met: 3.023% < 5% (min)"
    assert "7,168" in lines[1] and "r=8 on q_proj, v_proj" in lines[1]
    assert "237,120" in lines[2] and "138,816" in lines[2]
    # r=14 gives 5.1%, r=13 gives 4.8%
    assert "r >= 14 on these targets" in lines[-1] and "the smallest policy rank that fits is r=16" in lines[-1]
    assert_param_budget(model, min_pct=3.0, max_pct=3.1)


def test_budget_upper_bound_suggests_a_smaller_rank(lora_model):
    pattern = r"exceeded: 5.868% > 2% \(max\)[\s\S]*r <= 5 on these targets \(now r=16\); policy rank r=4 fits"
    with pytest.raises(LoraAssertionError, match=pattern):
        assert_param_budget(lora_model(lora_config(16)), min_pct=0.0, max_pct=2.0)


def test_alpha_ratio_reads_each_layers_real_scaling(lora_model):
    model = lora_model(lora_config(8, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8}))
    assert_alpha_ratio(model)
    bad = lora_model(lora_config(8, rank_pattern={"v_proj": 4}))  # v_proj: alpha 16 at r=4 -> ratio 4
    with pytest.raises(LoraAssertionError, match=r"16 / 4 = 4, policy wants 2 \(at 4 modules: v_proj\)"):
        assert_alpha_ratio(bad)


def test_alpha_ratio_rslora_rule():
    assert_alpha_ratio(lora_config(16, alpha=2 * math.sqrt(16), use_rslora=True))
    with pytest.raises(LoraAssertionError, match=r"lora_alpha / sqrt\(r\)[\s\S]*fix: lora_alpha = 8 for r=16"):
        assert_alpha_ratio(lora_config(16, use_rslora=True))
    assert_alpha_ratio(lora_config(16, use_rslora=True), rslora="alpha")
    with pytest.raises(LoraAssertionError, match="rsLoRA is forbidden"):
        assert_alpha_ratio(lora_config(16, use_rslora=True), rslora="forbid")


def test_alpha_ratio_warns_on_custom_init():
    from pytest_lora import LoraPolicyWarning

    with pytest.warns(LoraPolicyWarning, match="assumes PEFT's default init"):
        assert_alpha_ratio(lora_config(8, init_lora_weights="gaussian"))


def test_shapes_against_a_config_of_another_rank_fail(lora_model):
    model = lora_model(lora_config(8))
    assert_adapter_shapes(model)
    with pytest.raises(LoraAssertionError) as info:
        assert_adapter_shapes(model, lora_config(16))
    message = str(info.value)
    assert "lora_A (8, 64), lora_B (64, 8); expected (16, 64), (64, 16)" in message
    assert "retrain from scratch" in message


def test_shapes_flag_trainable_params_outside_adapters(lora_model):
    model = lora_model(lora_config(8))
    model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(LoraAssertionError, match=r"1 trainable parameter.*model.norm.weight"):
        assert_adapter_shapes(model)


def test_overfit_on_synthetic_curves():
    train = [3.0 - 0.05 * i for i in range(40)]
    val = [2.9, 2.8, 2.7, 2.65, 2.7, 2.8, 2.9, 3.0]
    with pytest.raises(LoraAssertionError, match=r"overfits[\s\S]*lower r to 4-8"):
        assert_no_overfit(train, val)
    assert_no_overfit(train, [2.9, 2.8, 2.7, 2.6, 2.5, 2.45, 2.4, 2.35])


def test_adapters_off_the_loss_path_fail_loudly(lora_model, lora_train):
    model = lora_model(lora_config(8))
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] = 0.0  # the adapters' output is multiplied away
    with pytest.raises(TrainingError, match="all 8 lora_B tensors have zero gradient at step 1"):
        lora_train(model, steps=3)
