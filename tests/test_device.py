"""The GPU path: the same code on device "cuda" (CuPy on a GPU, in CI the stand-in for it).

The op table and the model tests run on both devices through the `device` fixture
(tests/test_ops.py, tests/test_model.py); here: generation, checkpoints, Module.to with
optimizer state, a resumed run, what one training step copies between host and device,
where dropout draws its masks, and the errors a wrong device gets.
"""
import sys
import types

import numpy as np
import pytest

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from tests import cupy_standin
from tinygrad_llm import Tensor, backend
from tinygrad_llm.train import calc_loss_batch, train, train_model_simple

CFG = {"vocab_size": 40, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": True}


def model_on(device, cfg=CFG, seed=0, dtype="float64"):
    return tl.GPTModel(cfg, dtype=dtype, seed=seed).to(device=device)


# ---- the stand-in keeps CuPy's rules ---------------------------------------------------------


def test_the_standin_refuses_what_cupy_refuses():
    x = cupy_standin.asarray(np.ones(3))
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        np.ones(3) * x
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        x * np.asarray(2.0)  # a 0-d host array is an array too
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        cupy_standin.where(np.ones(3, bool), x, x)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    # What CuPy accepts: Python and NumPy scalars, host index arrays (copied to the device).
    assert isinstance(x * 2.0 + np.float32(1.0), cupy_standin.ndarray)
    assert isinstance(x.sum(), cupy_standin.ndarray)  # reductions stay on the device
    assert x[np.array([0, 2])].shape == (2,)
    np.testing.assert_array_equal(cupy_standin.asnumpy(x), np.ones(3))


def test_the_standin_counts_every_trip_to_the_host(standin_cuda):
    x = cupy_standin.asarray(np.arange(4.0))
    assert standin_cuda == {"to_device": 1}
    float(x.sum()), x.max().item(), bool(x[1] > 0), x.get()
    assert standin_cuda == {"to_device": 1, "to_host": 4}


# ---- generation, checkpoints, moving a model -------------------------------------------------


def test_generation_on_the_device_with_and_without_cache_equals_the_cpu():
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    on_cpu = tl.generate(model_on("cpu"), prompt, 12, context_size=8)  # past the context: the window slides
    model = model_on("cuda")
    cached = tl.generate(model, prompt, 12, context_size=8, use_cache=True)
    uncached = tl.generate(model, prompt, 12, context_size=8, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached, on_cpu)
    sampled = [tl.generate(model, prompt, 6, context_size=8, temperature=1.0, top_k=10, top_p=0.9, seed=5,
                           use_cache=use_cache) for use_cache in (True, False)]
    np.testing.assert_array_equal(*sampled)


def train_step(model, optimizer, ids, targets):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(ids), targets)
    loss.backward()
    tl.optim.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    return loss.item()


IDS, TARGETS = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[2, 3, 4, 5], [6, 7, 8, 9]])


def test_checkpoint_saved_from_the_device_loads_to_the_device_and_resumes(tmp_path):
    path = tmp_path / "ck.safetensors"
    model = model_on("cuda")
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_step(model, optimizer, IDS, TARGETS)
    tl.save_checkpoint(path, model, optimizer, step=1)

    fresh = model_on("cuda", seed=9)
    fresh_optimizer = tl.optim.AdamW(fresh.parameters(), lr=5.0)
    assert tl.load_checkpoint(path, fresh, fresh_optimizer) == {"step": 1}
    assert fresh.device == "cuda"
    assert all(p.device == "cuda" for p in fresh.parameters())
    assert all(backend.device_of(a) == "cuda" for s in fresh_optimizer.state.values()
               for a in s.values() if hasattr(a, "shape"))
    # Weights and AdamW moments came back: the next steps are identical.
    for _ in range(2):
        assert train_step(model, optimizer, IDS, TARGETS) == train_step(fresh, fresh_optimizer, IDS, TARGETS)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)

    # The same file loads into a CPU model too.
    on_cpu = model_on("cpu", seed=9)
    tl.load_checkpoint(path, on_cpu)
    assert on_cpu.device == "cpu"


def test_module_to_moves_the_optimizer_state_along():
    # Two CPU steps, then the model moves to the device and two more: the same as four on the CPU.
    # float64; the device takes other but equally exact paths (row-max softmax shift, scatter-add
    # embedding gradient), so the results agree to rounding, ~1e-15, far below 1e-10.
    staying, moving = model_on("cpu"), model_on("cpu")
    opt_staying = tl.optim.AdamW(staying.parameters(), lr=1e-2, weight_decay=0.1)
    opt_moving = tl.optim.AdamW(moving.parameters(), lr=1e-2, weight_decay=0.1)
    losses = [train_step(staying, opt_staying, IDS, TARGETS) for _ in range(4)]
    moved_losses = [train_step(moving, opt_moving, IDS, TARGETS) for _ in range(2)]
    moving.to("cuda")
    moved_losses += [train_step(moving, opt_moving, IDS, TARGETS) for _ in range(2)]
    assert all(backend.device_of(s["exp_avg"]) == "cuda" for s in opt_moving.state.values())
    np.testing.assert_allclose(moved_losses, losses, rtol=1e-10)
    for (name, a), b in zip(staying.state_dict().items(), moving.state_dict().values()):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12, err_msg=name)


def test_a_run_on_the_device_resumes_bit_for_bit(tmp_path):
    cfg = {**CFG, "drop_rate": 0.1}  # dropout on: its masks must resume too
    batches = [(rng.integers(0, 40, (2, 8)), rng.integers(0, 40, (2, 8)))
               for rng in [np.random.default_rng(4)] for _ in range(5)]

    def run(**options):
        tl.manual_seed(3)
        model = tl.GPTModel(cfg, dtype="float32").to("cuda")
        optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        losses = train_model_simple(model, batches, batches[:1], optimizer, "cuda", num_epochs=2, eval_freq=3,
                                    eval_iter=1, start_context=None, tokenizer=None, grad_clip=1.0, progress=False,
                                    **options)
        return losses, model.state_dict(), len(batches)

    whole, weights, steps_per_epoch = run()
    checkpoint = tmp_path / "run.safetensors"
    run(checkpoint_path=checkpoint, stop_at_step=steps_per_epoch + 2)
    resumed, resumed_weights, _ = run(checkpoint_path=checkpoint, resume=True)
    assert resumed == whole
    for name, array in weights.items():
        np.testing.assert_array_equal(resumed_weights[name], array, err_msg=name)


# ---- one training step touches the host for the batch and the loss only -----------------------


def test_a_training_step_copies_the_batch_in_and_the_loss_out_and_nothing_else(standin_cuda):
    cfg = {**CFG, "drop_rate": 0.1}
    model = tl.GPTModel(cfg, dtype="float32", seed=0).to("cuda")
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(2):  # the first step also creates the AdamW moments
        standin_cuda.clear()
        optimizer.zero_grad()
        loss = calc_loss_batch(IDS, TARGETS, model, "cuda")
        loss_value = loss.item()
        loss.backward()
        tl.optim.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        assert standin_cuda == {"to_device": 2, "to_host": 1}, f"step {step}: {dict(standin_cuda)}"
        assert np.isfinite(loss_value)


def test_the_training_loop_touches_the_host_only_for_each_batch_and_its_loss(standin_cuda):
    # train() with warmup, cosine decay and clipping: per step still 2 copies in, 1 out.
    model = tl.GPTModel({**CFG, "drop_rate": 0.1}, dtype="float32", seed=0).to("cuda")
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 40, (2, 8)), rng.integers(0, 40, (2, 8))) for _ in range(4)]
    standin_cuda.clear()
    train(model, optimizer, batches, lambda model, batch: calc_loss_batch(*batch, model, "cuda"), num_epochs=1,
          warmup_steps=2, cosine_decay=True, grad_clip=1.0, clip_during_warmup=True, progress=False)
    assert standin_cuda == {"to_device": 2 * len(batches), "to_host": len(batches)}


def test_dropout_masks_are_made_on_the_device_with_the_expected_rate(standin_cuda):
    tl.manual_seed(0)
    x = Tensor(np.ones((200, 1000), np.float32), device="cuda", requires_grad=True)
    upstream = Tensor(np.ones((200, 1000), np.float32), device="cuda").data
    standin_cuda.clear()
    out = F.dropout(x, 0.3)
    out.backward(upstream)
    assert standin_cuda["to_host"] == 0 and standin_cuda["to_device"] == 0
    kept = backend.to_host(out.data) != 0
    # Binomial: 5 standard deviations of the dropped fraction, 5 sqrt(0.3 0.7 / 2e5) = 0.005.
    assert abs(1 - kept.mean() - 0.3) < 0.005
    np.testing.assert_array_equal(backend.to_host(x.grad) != 0, kept)  # the backward uses the same mask
    # Neighbouring elements and successive masks are independent: each pair's agreement is
    # that of two independent draws, 0.7^2 + 0.3^2 = 0.58, within 0.005.
    assert abs((kept[:, 1:] == kept[:, :-1]).mean() - 0.58) < 0.005
    again = backend.to_host(F.dropout(x, 0.3).data) != 0
    assert abs((again == kept).mean() - 0.58) < 0.005


def test_causal_masks_are_built_once_per_shape_on_the_device(standin_cuda):
    q = Tensor(np.ones((1, 2, 5, 4)), device="cuda")
    F._causal_bias.cache_clear()
    for _ in range(3):
        F.scaled_dot_product_attention(q, q, q)
    assert F._causal_bias.cache_info().misses == 1
    assert standin_cuda["to_device"] == 1 and standin_cuda["to_host"] == 0  # q's one copy
    F.scaled_dot_product_attention(q[:, :, -1:], q, q)  # one query (a KV-cache step) needs no mask
    assert F._causal_bias.cache_info().misses == 1


# ---- errors that name the device ---------------------------------------------------------------


def test_mixing_devices_names_both():
    on_cpu, on_cuda = Tensor(np.ones(3)), Tensor(np.ones(3), device="cuda")
    with pytest.raises(ValueError, match="devices 'cpu' and 'cuda'"):
        on_cpu + on_cuda
    with pytest.raises(ValueError, match="devices 'cpu' and 'cuda'"):
        F.linear(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 3)), device="cuda"))
    with pytest.raises(ValueError, match="devices 'cpu' and 'cuda'"):
        tl.concatenate([on_cpu, on_cuda])


@pytest.fixture
def no_cuda_module():
    previous = backend.use_cuda_module(None)
    yield
    backend.use_cuda_module(previous)


def test_cuda_without_cupy_names_the_package(no_cuda_module, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(RuntimeError, match=r"needs CuPy, which is not installed: pip install 'tinygrad_llm\[gpu\]'"):
        Tensor(np.ones(2), device="cuda")
    with pytest.raises(RuntimeError, match="needs CuPy"):
        tl.GPTModel(CFG).to("cuda")


def test_cuda_without_a_gpu_says_so(no_cuda_module, monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, and CuPy finds none .*cudaErrorNoDevice"):
        Tensor(np.ones(2), device="cuda")
