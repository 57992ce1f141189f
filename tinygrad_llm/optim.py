"""Optimizers with torch's arithmetic, gradient clipping and the appendix-D learning-rate schedule.

The updates run in place over cache-sized chunks of each parameter: NumPy's elementwise
ops make one pass over memory each, so updating a 163M-parameter model op by op would
stream gigabytes; chunk by chunk, the second and later passes hit the cache. AdamW hands
pieces of the parameters to every core (`cpu.parallel_map`).
"""
import math

import numpy as np

from . import backend, cpu, cuda, validation
from .backend import xp_of

# Elements per chunk: an update's five chunks (512 KB each in float32) stay in the cache
# between passes, and there are few enough calls that the threads seldom wait for the GIL.
CHUNK = 1 << 17
PIECE = 1 << 20  # elements per task handed to a thread: enough tasks to balance the cores


def _param_groups(params, defaults):
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**defaults, **group, "params": list(group["params"])} for group in params]
    return [{**defaults, "params": params}]


def _chunks(n, xp):
    step = CHUNK if xp is np else max(n, 1)
    return ((start, min(start + step, n)) for start in range(0, n, step))


class Optimizer:
    def __init__(self, params, defaults):
        self.param_groups = _param_groups(params, defaults)
        self.state = {}  # id(param) -> dict of arrays and counters

    def parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def _state_of(self, p):
        """The state of parameter p, moved beside p when Module.to moved p since the last step."""
        state = self.state.setdefault(id(p), {})
        for name, value in state.items():
            if hasattr(value, "shape") and (backend.device_of(value) != p.device or value.dtype != p.dtype):
                state[name] = backend.to_device(value, p.device).astype(p.dtype, copy=False)
        return state

    def state_dict(self):
        """Per-parameter state in parameter order (index -> {name: array or number}) and the groups."""
        index = {id(p): i for i, p in enumerate(self.parameters())}
        return {
            "state": {index[key]: dict(value) for key, value in self.state.items() if key in index},
            "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups],
        }

    def load_state_dict(self, state_dict):
        params = self.parameters()
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.state = {}
        for i, value in state_dict["state"].items():
            p = params[int(i)]
            self.state[id(p)] = {k: (xp_of(p.data).asarray(v, dtype=p.dtype) if getattr(v, "ndim", 0) else v)
                                 for k, v in value.items()}


class SGD(Optimizer):
    """torch.optim.SGD: g += wd * p; buf = momentum * buf + g; p -= lr * buf."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        for group in self.param_groups:  # torch refuses these too
            for key in ("lr", "momentum", "weight_decay"):
                validation.number(f"SGD {key}", group[key], minimum=0.0)

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p.data
                if group["momentum"]:
                    state = self._state_of(p)
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = grad.copy()
                    else:
                        state["momentum_buffer"] *= group["momentum"]
                        state["momentum_buffer"] += grad
                    grad = state["momentum_buffer"]
                p.data -= group["lr"] * grad


class AdamW(Optimizer):
    """torch.optim.AdamW: decoupled weight decay, bias-corrected moments.

        p <- p (1 - lr wd)
        m <- m + (1 - b1) (g - m)            v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:  # torch refuses these too
            for key in ("lr", "eps", "weight_decay"):
                validation.number(f"AdamW {key}", group[key], minimum=0.0)
            if len(group["betas"]) != 2:
                raise ValueError(f"AdamW betas must be two numbers, got {group['betas']!r}")
            for beta in group["betas"]:
                validation.number("AdamW betas", beta, minimum=0.0, maximum=1.0, below=True)

    def step(self):
        tasks = []
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                xp = xp_of(p.data)
                state = self._state_of(p)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = xp.zeros_like(p.data)
                    state["exp_avg_sq"] = xp.zeros_like(p.data)
                state["step"] += 1
                step_size = lr / (1 - beta1 ** state["step"])
                bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
                arrays = [a.reshape(-1) for a in (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                step = PIECE if xp is np else max(p.size, 1)
                constants = (lr * decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
                tasks += [(*(a[lo:lo + step] for a in arrays), *constants) for lo in range(0, p.size, step)]
        if tasks and xp_of(tasks[0][0]) is np:
            cpu.parallel_map(_adamw_update, tasks)
        else:  # a GPU: one fused kernel per parameter, or the array ops
            update = cuda.adamw_update if tasks and cuda.kernels_on("cuda") else _adamw_update
            for task in tasks:
                update(*task)


def _adamw_update(param, grad, exp_avg, exp_avg_sq, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    # The update of the class docstring on flat arrays, in place, chunk by chunk, with its
    # last step multiplied through by c = sqrt(1 - b2^t) (one pass less):
    #   step_size * m / (sqrt(v) / c + eps) = (step_size c) * m / (sqrt(v) + eps c)
    xp = xp_of(param)
    scratch = xp.empty(min(CHUNK, param.size) if xp is np else param.size, param.dtype)
    for lo, hi in _chunks(param.size, xp):
        p_, g_, m_, v_, t_ = param[lo:hi], grad[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], scratch[:hi - lo]
        p_ *= 1 - decay
        xp.subtract(g_, m_, out=t_)
        t_ *= 1 - beta1
        m_ += t_
        v_ *= beta2
        xp.multiply(g_, g_, out=t_)
        t_ *= 1 - beta2
        v_ += t_
        xp.sqrt(v_, out=t_)
        t_ += eps * bias_correction2_sqrt
        xp.divide(m_, t_, out=t_)
        t_ *= step_size * bias_correction2_sqrt
        p_ -= t_


def clip_grad_norm_(params, max_norm):
    """Scale all gradients together so their joint L2 norm is at most max_norm (as torch).

    Returns the norm before clipping; the scale is max_norm / (norm + 1e-6), applied when < 1.
    On the CPU the norm is a float; on a GPU it stays there, a 0-d array (float() of it
    waits for the device), and the scale min(1, ...) is applied without asking the host.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating)) or not max_norm >= 0:
        # NaN fails >= 0; inf is allowed, as in torch: the norm is measured and nothing is clipped
        raise ValueError(f"max_norm must be a number >= 0 (inf measures without clipping), got {max_norm!r}")
    grads = list({id(p.grad): p.grad for p in params if p.grad is not None}.values())
    if not grads:
        return 0.0
    xp = xp_of(grads[0])
    if xp is not np:
        total = xp.sqrt(sum(xp.vdot(g.reshape(-1), g.reshape(-1)).astype(np.float64) for g in grads))
        scale = xp.minimum(max_norm / (total + 1e-6), 1.0)
        for g in grads:
            g *= scale.astype(g.dtype)
        return total
    total = math.sqrt(sum(float(np.vdot(g.reshape(-1), g.reshape(-1))) for g in grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= g.dtype.type(scale)
    return total


def lr_at_step(step, peak_lr, total_steps, warmup_steps=0, initial_lr=0.0, min_lr=0.0):
    """Appendix D's schedule: linear warmup from initial_lr to peak_lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
