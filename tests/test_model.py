import math

import pytest
import torch
import torch.nn.functional as F

from gptforge.common import UserError
from gptforge.config import PRESETS, ModelConfig, resolve_model_config
from gptforge.model import GPT, KVCache, count_parameters, linear_cross_entropy, manual_attention


def tiny(vocab=100, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=vocab, **kw))).eval()


@pytest.mark.parametrize("preset,expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200)])
def test_gpt2_parameter_counts_match_published(preset, expected):
    with torch.device("meta"):
        model = GPT(resolve_model_config(ModelConfig(preset=preset)))
    assert count_parameters(model) == expected


def test_baby_preset_is_nanogpt_shakespeare_char():
    cfg = resolve_model_config(ModelConfig(preset="baby", vocab_size=65))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (6, 6, 384, 256)
    with torch.device("meta"):
        assert round(count_parameters(GPT(cfg)) / 1e6, 2) == 10.75  # nanoGPT reports 10.65M + wpe


def test_preset_fields_can_be_overridden_and_unknown_preset_is_clear():
    cfg = resolve_model_config(ModelConfig(preset="baby", n_layer=2))
    assert cfg.n_layer == 2 and cfg.n_embd == 384
    with pytest.raises(UserError, match="unknown model preset"):
        resolve_model_config(ModelConfig(preset="gpt5"))
    with pytest.raises(UserError, match="not divisible"):
        ModelConfig(n_embd=100, n_head=3).validate()
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "baby", "tiny"}


def test_vocab_is_padded_but_logits_are_not():
    model = tiny(vocab=100)
    assert model.transformer.wte.weight.shape[0] == 128
    logits, _ = model(torch.randint(0, 100, (2, 5)))
    assert logits.shape == (2, 5, 100)


def test_tied_embeddings_and_untied_option():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=1000)
    model = GPT(cfg)
    expected = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.c_attn.bias == 0)
    no_bias = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=50, bias=False))
    assert no_bias.transformer.h[0].attn.c_attn.bias is None and no_bias.transformer.ln_f.bias is None


def test_initial_loss_is_near_uniform():
    model = tiny(vocab=100)
    x, y = torch.randint(0, 100, (2, 8, 32))
    _, loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(100), abs=0.1)


def test_sdpa_matches_manual_attention_reference():
    model = tiny()
    x = torch.randint(0, 100, (3, 40))
    fast, _ = model(x)
    model.set_attention("manual")
    ref, _ = model(x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(manual_attention(q, k, v, attn_mask=mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_attention_is_causal():
    model = tiny()
    x = torch.randint(0, 100, (1, 20))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 100
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_cache_matches_full_forward_in_chunks():
    model = tiny()
    x = torch.randint(0, 100, (2, 30))
    full, _ = model(x)
    cache = KVCache(model.config, 2, 40, torch.device("cpu"))
    pieces = [model(x[:, :10], kv_cache=cache)[0], model(x[:, 10:17], kv_cache=cache)[0]]
    pieces += [model(x[:, t:t + 1], kv_cache=cache)[0] for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 30


def test_left_padded_cache_rows_match_unpadded_rows():
    model = tiny()
    x = torch.randint(0, 100, (3, 12))
    pad = torch.tensor([0, 4, 7])
    cache = KVCache(model.config, 3, 20, torch.device("cpu"), pad_lens=pad)
    logits, _ = model(x, kv_cache=cache)
    step = torch.randint(0, 100, (3, 1))
    nxt, _ = model(step, kv_cache=cache)
    for b in range(3):
        alone, _ = model(torch.cat([x[b:b + 1, pad[b]:], step[b:b + 1]], 1))
        torch.testing.assert_close(logits[b, pad[b]:], alone[0, :-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nxt[b, 0], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()


def test_loss_ignores_minus_100_targets_and_matches_reference():
    model = tiny()
    x = torch.randint(0, 100, (2, 10))
    y = x.clone()
    y[:, :5] = -100
    no_logits, loss = model(x, y)
    assert no_logits is None  # the loss path never materialises logits
    logits, _ = model(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 100), y[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 4096])
def test_chunked_linear_cross_entropy_matches_reference_gradients(chunk_rows):
    torch.manual_seed(0)
    x = torch.randn(150, 24, requires_grad=True)
    w = torch.randn(128, 24, requires_grad=True)  # 128 padded rows, vocabulary 100
    t = torch.randint(0, 100, (150,))
    t[::9] = -100
    loss = linear_cross_entropy(x, w, t, vocab_size=100, chunk_rows=chunk_rows)
    (2.5 * loss).backward()  # an upstream gradient other than 1 must scale through
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((x @ w.t())[:, :100], t, ignore_index=-100)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, x.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-6, rtol=1e-5)
    assert torch.all(gw[100:] == 0)  # padding rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, 100, chunk_rows), ref)


def test_model_gradients_match_unfused_reference():
    model = tiny()
    x, y = torch.randint(0, 100, (2, 3, 16))
    _, loss = model(x, y)
    loss.backward()
    fused = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 100), y.reshape(-1)).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(fused[k], p.grad, atol=1e-6, rtol=1e-4, msg=k)


def test_dropout_is_active_only_in_training():
    model = tiny(dropout=0.5)
    x = torch.randint(0, 100, (2, 10))
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])


def test_too_long_input_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_fused_loss_with_a_frozen_head_skips_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(70, 8)  # frozen: requires_grad False
    t = torch.randint(0, 65, (10,))
    loss = linear_cross_entropy(x, w, t, 65, chunk_rows=4)
    loss.backward()
    ref_x = x.detach().clone().requires_grad_()
    F.cross_entropy((ref_x @ w.t())[:, :65], t).backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert w.grad is None


def test_grow_vocab_keeps_old_rows_and_outputs():
    from gptforge.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=60, vocab_multiple=64))
    model.transformer.wte.weight.data[60:] = 0  # padding rows, as checkpoints keep them
    idx = torch.randint(0, 60, (2, 8))
    before, _ = model(idx)
    old_rows = model.transformer.wte.weight[:60].detach().clone()
    model.grow_vocab(62)  # still inside the padding: same matrix size
    assert model.config.vocab_size == 62 and model.transformer.wte.weight.shape[0] == 64
    model.grow_vocab(70)  # beyond it: a larger padded matrix
    w = model.transformer.wte.weight
    assert w.shape[0] == 128 and model.lm_head.weight is w
    assert torch.equal(w[:60], old_rows)
    # near the mean embedding, yet distinct (a frozen embedding must still tell the new tokens apart)
    assert (w[60:70] - old_rows.mean(0)).norm(dim=1).max() < 0.25 * old_rows.norm(dim=1).mean()
    assert torch.unique(w[60:70], dim=0).shape[0] == 10
    assert not w[70:].any()
    after, _ = model(idx)
    torch.testing.assert_close(after[..., :60], before)  # old tokens' logits unchanged
    assert after.shape[-1] == 70


def test_classifier_reads_the_last_real_token_whatever_the_padding():
    from gptforge.model import GPTClassifier

    torch.manual_seed(0)
    model = GPTClassifier(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50), 3).eval()
    a, b = torch.randint(0, 50, (5,)), torch.randint(0, 50, (9,))
    padded = torch.full((2, 9), -1)
    padded[0, :5], padded[1] = a, b
    logits, loss = model(padded, torch.tensor([0, 2]))
    alone_a, _ = model(a[None])
    alone_b, _ = model(b[None])
    torch.testing.assert_close(logits, torch.cat([alone_a, alone_b]))
    assert logits.shape == (2, 3) and loss.ndim == 0
    loss.backward()
    assert model.classifier.weight.grad is not None
