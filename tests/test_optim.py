import pytest
import torch

from gptforge.checkpoint import flatten_optimizer_state, unflatten_optimizer_state
from gptforge.common import UserError
from gptforge.config import ModelConfig, TrainConfig, resolve_model_config
from gptforge.model import GPT
from gptforge.train.optim import Muon, make_optimizer, orthogonalize


def tiny_model():
    torch.manual_seed(0)
    return GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=50)))


def test_adamw_groups_decay_matrices_only():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [(32, 32), (32, 96), (128, 32)])
def test_orthogonalize_flattens_singular_values(shape):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    g = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v.t()  # singular values 0.1 .. 10
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.max() < 1.3 and s.min() > 0.5  # the quintic iteration lands them all near 1
    assert s.shape[0] == min(shape)


def test_muon_trains_and_uses_adamw_outside_hidden_matrices():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, Muon)
    hidden = opt.param_groups[0]
    assert hidden["use_muon"] and all(p.dim() == 2 for p in hidden["params"])
    assert all(p is not model.transformer.wte.weight for p in hidden["params"])
    x, y = torch.randint(0, 50, (2, 8, 32))
    losses = []
    for _ in range(30):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * g["lr_scale"]
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    # its state survives the checkpoint format (tensors to safetensors, the rest to JSON)
    tensors, layout = flatten_optimizer_state(opt.state_dict())
    restored = make_optimizer(tiny_model(), TrainConfig(optimizer="muon"), "cpu")
    restored.load_state_dict(unflatten_optimizer_state(tensors, layout))
    for a, b in zip(opt.state_dict()["state"].values(), restored.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(UserError, match="unknown optimizer"):
        make_optimizer(tiny_model(), TrainConfig(optimizer="sgd"), "cpu")
