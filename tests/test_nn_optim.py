"""Modules (names, state dicts, modes, initialisation) and optimizers, against torch."""
import copy
import math

import numpy as np
import pytest
import torch

import tinygrad_llm as tl
from reference import ops as ref
from tinygrad_llm import Tensor, nn, optim

# ---- modules ------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width):
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x + self.drop(self.ff(self.norm(x)))


class TinyModel(nn.Module):
    """Embedding, a ModuleList of blocks and a head tied to the embedding, as a GPT is laid out."""

    def __init__(self, vocab=10, width=4, tied=False):
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


BLOCK_NAMES = ["norm.scale", "norm.shift", "ff.0.weight", "ff.0.bias", "ff.2.weight", "ff.2.bias"]


def test_named_parameters_are_dotted_paths_in_the_order_set():
    names = [name for name, _ in TinyModel().named_parameters()]
    assert names == ["emb.weight", *[f"blocks.{i}.{name}" for i in (0, 1) for name in BLOCK_NAMES], "head.weight"]


def test_a_shared_parameter_is_listed_once():
    model = TinyModel(tied=True)
    assert "head.weight" not in dict(model.named_parameters())
    assert sum(p is model.emb.weight for p in model.parameters()) == 1


def test_state_dict_holds_host_arrays_of_every_parameter():
    model = TinyModel()
    state = model.state_dict()
    assert list(state) == [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert isinstance(state[name], np.ndarray)
        assert state[name].shape == p.shape and state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], p.numpy())


def test_load_state_dict_copies_values_from_numpy_or_torch_arrays():
    source, target = TinyModel(), TinyModel()
    state = source.state_dict()
    target.load_state_dict({name: torch.tensor(value) for name, value in state.items()})
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[name])


def test_load_state_dict_shape_mismatch_names_the_key_and_both_shapes():
    model = TinyModel()
    before = {name: value.copy() for name, value in model.state_dict().items()}
    state = {name: np.zeros_like(value) for name, value in before.items()}
    state["blocks.1.ff.0.weight"] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"blocks\.1\.ff\.0\.weight.*\(3, 4\).*\(8, 4\)"):
        model.load_state_dict(state)
    # Every key is checked before anything is copied: a failed load changes nothing.
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_load_state_dict_names_unknown_and_missing_keys():
    model = TinyModel()
    state = model.state_dict()
    with pytest.raises(KeyError, match=r"unexpected.*blocks\.0\.att\.bias"):
        model.load_state_dict({**state, "blocks.0.att.bias": np.zeros(4)})
    del state["head.weight"]
    with pytest.raises(KeyError, match=r"missing.*head\.weight"):
        model.load_state_dict(state)


def test_load_state_dict_skips_a_modules_ignored_buffers():
    class WithMask(nn.Module):
        ignored_state_keys = ("mask",)  # like the book's attention, which saves its causal mask

        def __init__(self):
            self.proj = nn.Linear(2, 2)

    model = nn.ModuleList([WithMask()])
    model.load_state_dict({**model.state_dict(), "0.mask": np.ones((4, 4))})
    with pytest.raises(KeyError, match="proj.mask"):
        model.load_state_dict({**model.state_dict(), "0.proj.mask": np.ones((4, 4))})


def test_train_and_eval_reach_every_submodule_and_switch_dropout():
    model = TinyModel()
    ids = np.array([[1, 2, 3]])
    model.eval()
    assert all(not module.training for _, module in model.modules())
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())  # no dropout: deterministic
    model.train()
    assert all(module.training for _, module in model.modules())
    assert not np.array_equal(model(ids).numpy(), model(ids).numpy())


def test_zero_grad_clears_every_gradient():
    model = TinyModel()
    model(np.array([[1, 2]])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_to_dtype_converts_in_place_keeping_the_parameter_objects():
    model = TinyModel()
    params = model.parameters()
    before = model.state_dict()
    model(np.array([[1]])).sum().backward()
    model.to(dtype="float64")
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    for name, p in model.named_parameters():
        assert p.dtype == np.float64 and p.grad is None
        np.testing.assert_array_equal(p.numpy(), before[name])
    assert model(np.array([[1]])).dtype == np.float64


# ---- initialisation -------------------------------------------------------------------------


def test_linear_init_is_uniform_within_one_over_sqrt_fan_in():
    tl.manual_seed(0)
    layer = nn.Linear(256, 512)
    bound = 1 / math.sqrt(256)
    for p in (layer.weight, layer.bias):
        values = p.numpy()
        assert values.dtype == np.float32 and np.abs(values).max() <= bound
        # U(-b, b) has mean 0 and variance b^2 / 3; 5 standard errors of each estimate:
        assert abs(values.mean()) < 5 * bound / math.sqrt(3 * values.size)
        assert abs(values.var() / (bound**2 / 3) - 1) < 5 * math.sqrt(0.8 / values.size)
    assert layer.weight.shape == (512, 256) and layer.bias.shape == (512,)


def test_embedding_init_is_standard_normal():
    tl.manual_seed(0)
    values = nn.Embedding(1000, 64).weight.numpy()
    assert values.shape == (1000, 64)
    # N(0, 1): the mean has standard error 1/sqrt(n), the variance sqrt(2/n).
    assert abs(values.mean()) < 5 / math.sqrt(values.size)
    assert abs(values.var() - 1) < 5 * math.sqrt(2 / values.size)


def test_layer_norm_init_is_the_identity_affine_map():
    norm = nn.LayerNorm(6, dtype="float64")
    np.testing.assert_array_equal(norm.scale.numpy(), np.ones(6))
    np.testing.assert_array_equal(norm.shift.numpy(), np.zeros(6))
    assert norm.scale.dtype == np.float64


def test_manual_seed_makes_initialisation_repeatable():
    tl.manual_seed(7)
    first = TinyModel().state_dict()
    tl.manual_seed(7)
    second = TinyModel().state_dict()
    third = TinyModel().state_dict()  # the generator has moved on
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert not np.array_equal(first["emb.weight"], third["emb.weight"])


# ---- optimizers against torch -----------------------------------------------------------------


def parameter_pairs(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    return [nn.Parameter(v.copy()) for v in values], [torch.nn.Parameter(torch.tensor(v)) for v in values]


def set_gradients(ours, theirs, rng, scales):
    # Gradients of very different sizes: where g^2 is far below eps, eps dominates AdamW's step.
    for p, q, scale in zip(ours, theirs, scales):
        grad = (rng.standard_normal(p.shape) * scale).astype(p.dtype)
        p.grad, q.grad = grad, torch.tensor(grad)


# The last shape is larger than optim.CHUNK and no multiple of it, so the update runs in
# chunks with a short last one.
SHAPES = [(5, 3), (3,), (7,), (optim.CHUNK // 256 + 4, 256)]
GRADIENT_SCALES = [1.0, 1e-3, 1e-9, 10.0]


@pytest.mark.parametrize("dtype, rtol", [
    (np.float64, 1e-12),  # the same arithmetic: only a rounding or two per step apart
    (np.float32, 2e-6),   # 20 steps of float32 rounding (1.2e-7), which may round differently
])
def test_adamw_matches_torch_over_20_steps_with_a_schedule_and_groups(dtype, rtol):
    ours, theirs = parameter_pairs(SHAPES, dtype)
    assert ours[3].size > optim.CHUNK and ours[3].size % optim.CHUNK
    # Biases without weight decay, the usual GPT split; lr moves every step (appendix D).
    groups = lambda params: [{"params": [params[0], params[3]]}, {"params": params[1:3], "weight_decay": 0.0}]
    ours_opt = optim.AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    theirs_opt = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(1)
    for step in range(20):
        lr = optim.lr_at_step(step, peak_lr=1e-2, total_steps=20, warmup_steps=5, initial_lr=1e-4, min_lr=1e-3)
        for group in (*ours_opt.param_groups, *theirs_opt.param_groups):
            group["lr"] = lr
        set_gradients(ours, theirs, rng, GRADIENT_SCALES)
        ours_opt.step()
        theirs_opt.step()
    for p, q, start in zip(ours, theirs, parameter_pairs(SHAPES, dtype)[0]):
        assert p.dtype == dtype
        assert not np.array_equal(p.numpy(), start.numpy())
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=rtol, atol=rtol * 1e-2)


def test_adamw_resumes_from_its_state_dict_bit_identically():
    straight, resumed = (parameter_pairs(SHAPES[:2], np.float64)[0] for _ in range(2))
    straight_opt, resumed_opt = optim.AdamW(straight, lr=1e-2), optim.AdamW(resumed, lr=1e-2)
    rng = np.random.default_rng(3)
    for step in range(10):
        if step == 5:  # a fresh optimizer takes over from a saved copy of the state
            saved = copy.deepcopy(resumed_opt.state_dict())
            resumed_opt = optim.AdamW(resumed, lr=1e-2)
            resumed_opt.load_state_dict(saved)
        for p, q in zip(straight, resumed):
            p.grad = rng.standard_normal(p.shape)
            q.grad = p.grad.copy()
        straight_opt.step()
        resumed_opt.step()
    for p, q in zip(straight, resumed):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_sgd_with_momentum_and_weight_decay_matches_torch():
    ours, theirs = parameter_pairs(SHAPES[:3], np.float64)
    ours_opt = optim.SGD(ours, lr=0.05, momentum=0.9, weight_decay=0.01)
    theirs_opt = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, weight_decay=0.01)
    rng = np.random.default_rng(2)
    for _ in range(10):
        set_gradients(ours, theirs, rng, [1.0, 1.0, 1.0])
        ours_opt.step()
        theirs_opt.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.numpy(), q.detach().numpy(), rtol=1e-13)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips, and leaves alone
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = parameter_pairs(SHAPES[:3], np.float64)
    set_gradients(ours, theirs, np.random.default_rng(4), [1.0, 2.0, 0.1])
    norm = optim.clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert isinstance(norm, float)
    np.testing.assert_allclose(norm, expected.item(), rtol=1e-14)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-14)
    assert (norm > max_norm) == (max_norm == 0.5)


def test_lr_at_step_follows_the_books_appendix_d_schedule():
    schedule = dict(peak_lr=1e-3, warmup_steps=20, initial_lr=3e-5, min_lr=1e-6)
    total = 150
    for step in range(total):
        expected = ref.appendix_d_lr(step, total_training_steps=total, **schedule)
        assert math.isclose(optim.lr_at_step(step, total_steps=total, **schedule), expected, rel_tol=1e-12)


def test_tensor_to_dtype_keeps_requires_grad():
    x = Tensor(np.ones(2, np.float32), requires_grad=True).to(dtype="float64")
    assert x.dtype == np.float64 and x.requires_grad
