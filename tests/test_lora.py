"""LoRA: a wrapped model starts identical to its base, training moves only the adapters, merging folds
them in without changing outputs, adapter state round-trips, and the KV-cache path still agrees."""

import copy

import pytest
import torch
import torch.nn as nn

from gptforge.common import UserError
from gptforge.config import ModelConfig, TrainConfig, resolve_model_config
from gptforge.engine import Engine, SamplingParams
from gptforge.lora import (LoRAConfig, LoRALinear, apply_lora, count_trainable, load_lora_state_dict,
                           lora_state_dict, merge_lora)
from gptforge.model import GPT, KVCache, count_parameters
from gptforge.train.optim import make_optimizer

VOCAB = 100


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=VOCAB))).eval()


def batch(seed: int = 1, B: int = 4, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def train_adapters(model: GPT, steps: int = 5) -> None:
    """A few AdamW steps (the project's own optimizer builder, weight decay on) on a fixed batch."""
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1), "cpu")
    x = batch(seed=2, T=33)
    model.train()
    for _ in range(steps):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def test_wrapped_model_starts_identical_and_keeps_base_names():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp"]))
    x = batch()
    assert torch.equal(logits(model, x), logits(base, x))  # B = 0: the update is exactly zero

    keys, base_keys = set(model.state_dict()), set(base.state_dict())
    assert base_keys <= keys  # base weights keep their names: plain checkpoints still line up
    added = sorted(keys - base_keys)
    assert len(added) == 2 * 4 * base.config.n_layer  # A and B for 4 layers per block
    assert all(k.endswith((".lora_A", ".lora_B")) for k in added)
    assert "transformer.h.0.attn.c_attn.lora_A" in added and "transformer.h.1.mlp.c_proj.lora_B" in added
    assert type(model.lm_head) is nn.Linear  # the tied head is never wrapped
    assert model.lm_head.weight is model.transformer.wte.weight
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LoRALinear) and c_attn.lora_A.shape == (4, 32) and c_attn.lora_B.shape == (96, 4)
    assert model.transformer.h[0].attn.c_proj.residual_projection


def test_targets_select_layers():
    model = apply_lora(tiny(), LoRAConfig(rank=2, targets="qkv"))  # a command line's "qkv" / "attn,mlp"
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, LoRALinear)
    assert type(block.attn.c_proj) is nn.Linear and type(block.mlp.c_fc) is nn.Linear
    with pytest.raises(UserError, match="unknown lora target"):
        apply_lora(tiny(), LoRAConfig(targets=["attn", "head"]))
    with pytest.raises(UserError, match="no lora targets"):
        apply_lora(tiny(), LoRAConfig(targets=[]))
    with pytest.raises(UserError, match="rank"):
        apply_lora(tiny(), LoRAConfig(rank=0))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_training_changes_only_the_adapters():
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_adapters(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(lora_state_dict(model))  # every adapter moved (weight decay moves A too) ...
    # ... and not one bit of any base weight, bias, LayerNorm or embedding did
    assert all(k.endswith((".lora_A", ".lora_B")) for k in changed)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_merged_equals_unmerged_and_w_plus_scaled_ba():
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp"]))
    train_adapters(model)
    x = batch()
    unmerged = logits(model, x)
    layer = model.transformer.h[1].mlp.c_fc
    expected_w = layer.weight + (8 / 4) * layer.lora_B @ layer.lora_A
    base_keys = set(tiny().state_dict())

    merged_model = merge_lora(model)
    merged = logits(merged_model, x)
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert not torch.equal(merged, logits(tiny(), x))  # the adapters did change the model
    assert torch.allclose(merged_model.transformer.h[1].mlp.c_fc.weight, expected_w, atol=1e-7)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == base_keys  # loads as a plain checkpoint
    assert merged_model.lm_head.weight is merged_model.transformer.wte.weight
    assert all(p.requires_grad for p in merged_model.parameters())


def test_adapter_state_is_small_and_restores_outputs_exactly():
    cfg = LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp"])
    model = apply_lora(tiny(), cfg)
    train_adapters(model)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    trainable, total = count_trainable(model)
    assert sum(v.numel() for v in state.values()) == trainable < total / 5

    other = apply_lora(tiny(), cfg)  # same base weights, fresh (different) A, zero B
    x = batch()
    assert not torch.equal(logits(other, x), logits(model, x))
    load_lora_state_dict(other, state)
    assert torch.equal(logits(other, x), logits(model, x))


def test_adapter_loading_is_strict():
    state = lora_state_dict(apply_lora(tiny(), LoRAConfig(rank=4, targets=["attn"])))
    with pytest.raises(UserError, match="no LoRA adapters"):
        load_lora_state_dict(tiny(), state)
    with pytest.raises(UserError, match="rank they were trained with"):
        load_lora_state_dict(apply_lora(tiny(), LoRAConfig(rank=2, targets=["attn"])), state)
    with pytest.raises(UserError, match="missing .*mlp"):
        load_lora_state_dict(apply_lora(tiny(), LoRAConfig(rank=4, targets=["attn", "mlp"])), state)
    with pytest.raises(UserError, match="unexpected .*attn.c_proj"):
        load_lora_state_dict(apply_lora(tiny(), LoRAConfig(rank=4, targets=["qkv"])), state)


def test_full_state_with_adapters_reloads_into_a_meta_built_model():
    # What a checkpoint loader does: build on the meta device, adapt, materialise, load base + adapters.
    cfg = LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp"])
    model = apply_lora(tiny(), cfg)
    train_adapters(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        fresh = GPT(model.config)
    fresh = apply_lora(fresh, cfg).to_empty(device="cpu")
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.lm_head.weight = fresh.transformer.wte.weight  # assign=True unties; re-tie as load_model does
    x = batch()
    assert torch.equal(logits(fresh.eval(), x), logits(model, x))


def test_kv_cache_and_engine_agree_with_full_forward_under_lora():
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp"]))
    train_adapters(model)
    x = batch(B=2, T=30)
    full = logits(model, x)
    cache = KVCache(model.config, 2, 40, torch.device("cpu"))
    with torch.no_grad():
        pieces = [model(x[:, :10], kv_cache=cache)[0]]
        pieces += [model(x[:, t:t + 1], kv_cache=cache)[0] for t in range(10, 30)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)

    engine, params = Engine(model), SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert engine.generate(prompts, params, use_cache=True) == engine.generate(prompts, params, use_cache=False)


@pytest.mark.parametrize("targets,expected", [(["qkv"], 294_912), (["attn"], 442_368), (["attn", "mlp"], 1_179_648)])
def test_gpt2_trainable_counts_at_rank_8(targets, expected):
    # r * (in + out) per layer, 12 blocks: c_attn 8*(768+2304), c_proj 8*(768+768), c_fc/mlp.c_proj 8*(768+3072)
    with torch.device("meta"):
        model = GPT(resolve_model_config(ModelConfig(preset="gpt2")))
        full = count_parameters(model)
        apply_lora(model, LoRAConfig(rank=8, targets=targets))
    trainable, _ = count_trainable(model)
    assert trainable == expected
    assert trainable / full < 0.01  # under 1% of GPT-2 small's 124M
