"""The fused ops of a GPT, each a pair of plain array functions in the style of llm.c.

`*_forward(inputs...) -> (out, cache)` computes the result and keeps what the gradient
needs; `*_backward(dout, cache) -> grads` returns one gradient per input (None for
inputs such as token ids). `tensor.fused` turns each pair into an autograd op; the
public names (`linear`, `layer_norm`, ...) take Tensors. The arrays may be NumPy or CuPy:
`xp_of` picks the module. Shapes in comments: B batch, T time, C channels, H heads,
D head size, V vocabulary, N = any number of leading positions.
"""
import functools
import math

import numpy as np

from . import backend, cpu, cuda
from .backend import xp_of
from .tensor import Tensor, fused


class _KernelCache:
    """The cache of an op that ran cuda.py's fused kernel, with the kernel's own backward:
    the op's backward hands both on, whatever TINYGRAD_LLM_CUDA_KERNELS says by then."""

    def __init__(self, backward, cache):
        self.backward, self.cache = backward, cache


def _with_kernel(kernel_forward, kernel_backward, *inputs, **options):
    out, cache = kernel_forward(*inputs, **options)
    return out, _KernelCache(kernel_backward, cache)


def check_float(x, op):
    # In-place float arithmetic on an integer array fails deep inside NumPy; say what is wrong.
    if x.dtype.kind != "f":
        raise TypeError(f"{op} needs a float tensor, got {x.dtype}")


# ---- linear -------------------------------------------------------------------------------

FEW_ROWS = 32  # inputs of at most this many rows take the W x^T form (measured: 4-32 rows gain, 64+ lose)


def linear_forward(x, weight, bias=None):
    # x: (N..., in)  weight: (out, in)  bias: (out,)  ->  (N..., out)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape} "
                         f"(expected last dimension {weight.shape[1]})")
    x2 = x.reshape(-1, x.shape[-1])
    if xp_of(x2) is np and x2.shape[0] <= FEW_ROWS:
        # A few rows (a decoding step of a batch): OpenBLAS runs W x^T, with the long side
        # first, 1.4-1.8x faster than x W^T for 4-32 rows here, on its own threads
        # (cpu.matmul_thin); the (rows, out) transpose costs a copy of the small result.
        out = np.ascontiguousarray(cpu.matmul_thin(weight, x2.T).T)
    else:
        out = cpu.matmul(x2, weight.T)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0]), (x2, x.shape, weight, bias is not None)


def linear_backward(dout, cache, needs_grad=(True, True, True)):
    # out = x W^T + b  =>  dx = dout W,  dW = dout^T x,  db = sum of dout over positions
    # needs_grad (x, W, b): an input that needs no gradient (the frozen part's output, a
    # frozen weight) costs no matmul.
    x2, x_shape, weight, has_bias = cache
    need_dx, need_dweight = needs_grad[:2]
    d2 = dout.reshape(-1, dout.shape[-1])
    products = iter(cpu.matmuls([(d2, weight)] * need_dx + [(d2.T, x2)] * need_dweight))
    dx = next(products).reshape(x_shape) if need_dx else None
    dweight = next(products) if need_dweight else None
    dbias = d2.sum(axis=0) if has_bias and needs_grad[2] else None
    return dx, dweight, dbias


# ---- linear with a LoRA adapter (appendix E) ------------------------------------------------


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scale):
    # x: (N..., in)  weight: (out, in)  bias: (out,) or None  lora_A: (in, r)  lora_B: (r, out)
    #   ->  (N..., out) = x W^T + b + scale (x A) B
    # The update goes through the (N, r) product x A, never through the (out, in) matrix A B.
    n_in, n_out, rank = weight.shape[1], weight.shape[0], lora_A.shape[-1]
    if x.shape[-1] != n_in:
        raise ValueError(f"lora_linear: input of shape {x.shape} does not fit weight of shape {weight.shape} "
                         f"(expected last dimension {n_in})")
    if lora_A.shape != (n_in, rank) or lora_B.shape != (rank, n_out):
        raise ValueError(f"lora_linear: adapters A {lora_A.shape} and B {lora_B.shape} do not fit weight of shape "
                         f"{weight.shape} (expected A ({n_in}, r) and B (r, {n_out}))")
    x2 = x.reshape(-1, n_in)                                  # (N, in)
    # Two calls, not one cpu.matmuls: paired, the large product would get one core only.
    out, xA = cpu.matmul(x2, weight.T), cpu.matmul(x2, lora_A)  # (N, out), (N, r)
    if bias is not None:
        out += bias
    xA *= scale                                               # s x A: (N, r), the smallest place for s
    out += cpu.matmul(xA, lora_B)
    cache = (x2, x.shape, weight, lora_A, lora_B, xA, scale, bias is not None)
    return out.reshape(*x.shape[:-1], n_out), cache


def lora_linear_backward(dout, cache, needs_grad=(True, True, True, True, True)):
    # out = x W^T + b + h B with h = s x A (N, r). With g = dout (N, out):
    #   dB = h^T g                     (r, out)
    #   dh = g B^T, so d(xA) = s g B^T (N, r), call it u
    #   dA = x^T u                     (in, r)
    #   dx = g W + u A^T               (N, in): the frozen path and the adapter's
    #   dW = g^T x,  db = sum of g over positions   (only for a weight that is trained)
    # needs_grad (x, W, b, A, B): only those are computed. LoRA freezes W and b, so a step
    # costs dx, dA and dB, and no dx either behind frozen layers (the first block's inputs).
    x2, x_shape, weight, lora_A, lora_B, xA_scaled, scale, has_bias = cache
    needs_x, needs_weight, needs_bias, needs_A, needs_B = needs_grad
    g = dout.reshape(-1, dout.shape[-1])                      # (N, out)
    u = None
    if needs_x or needs_A:
        u = cpu.matmul(g, lora_B.T)                           # (N, r)
        u *= scale
    # The full-size products and the rank-r ones go to the cores as two groups of similar sizes.
    large = {"x": (g, weight), "weight": (g.T, x2)}           # (N, in), (out, in)
    small = {"A": (x2.T, u), "B": (xA_scaled.T, g)}           # (in, r), (r, out)
    wanted = {"x": needs_x, "weight": needs_weight, "A": needs_A, "B": needs_B}
    grads = {}
    for group in (large, small):
        names = [name for name in group if wanted[name]]
        if names:
            grads.update(zip(names, cpu.matmuls([group[name] for name in names])))
    dx = grads.get("x")
    if dx is not None:
        dx += cpu.matmul(u, lora_A.T)
        dx = dx.reshape(x_shape)
    dbias = g.sum(axis=0) if has_bias and needs_bias else None
    return dx, grads.get("weight"), dbias, grads.get("A"), grads.get("B")


# ---- the kept positions of a batch, packed and unpacked --------------------------------------


def unpack_rows_forward(x, keep):
    # x: (N, C), the positions of a (B, T) batch where keep (B, T) is true, row-major
    #   ->  (B, T, C): those rows in their places, zeros at the others
    out = xp_of(x).zeros((keep.size, x.shape[-1]), x.dtype)
    out[keep.reshape(-1)] = x
    return out.reshape(*keep.shape, x.shape[-1]), keep


def unpack_rows_backward(dout, keep):
    # out[keep] = x and the zeros depend on nothing  =>  dx = dout[keep]
    return dout.reshape(-1, dout.shape[-1])[keep.reshape(-1)], None


# ---- embedding ----------------------------------------------------------------------------


def check_token_ids(ids, vocab_size, what="token id"):
    """Integer ids, all in [0, vocab_size), or a ValueError naming the first bad one.

    Ids on the host are checked there, before they are copied to a device; ids already on
    a GPU cost one sync (their minimum and maximum come to the host together).
    """
    ids = ids.data if isinstance(ids, Tensor) else ids
    ids = ids if backend.device_of(ids) == "cuda" else np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what}s must be integers, got dtype {ids.dtype}")
    if ids.size:
        xp = xp_of(ids)
        low, high = backend.to_host(xp.stack([ids.min(), ids.max()])).tolist()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{what} {bad} is out of range: the vocabulary has {vocab_size} entries "
                             f"(0..{vocab_size - 1})")
    return ids


def embedding_forward(ids, weight):
    # ids: (B, T) integers  weight: (V, C)  ->  (B, T, C); host ids are checked on the host,
    # then copied to the weight's device once.
    ids = backend.to_device(check_token_ids(ids, weight.shape[0]), backend.device_of(weight))
    return weight[ids], (ids, weight.shape, weight.dtype)


def embedding_backward(dout, cache):
    # out[b, t] = W[ids[b, t]]  =>  dW[v] = sum of dout[b, t] over the positions with ids[b, t] == v.
    # Repeated ids must add up: sort the ids, then sum each run of equal ids in one pass.
    # On a GPU: cuda.py's kernel sums the runs in id order; the array path scatter-adds
    # (atomic, so not bit-reproducible).
    ids, shape, dtype = cache
    if ids.size and cuda.kernels_on(backend.device_of(dout)):
        return None, cuda.embedding_backward(dout, ids, shape, dtype)
    xp = xp_of(dout)
    flat_ids = ids.reshape(-1)
    d2 = dout.reshape(-1, shape[1])
    dweight = xp.zeros(shape, dtype=dtype)
    if flat_ids.size == 0:
        return None, dweight
    if xp is not np:
        xp.add.at(dweight, flat_ids, d2)
        return None, dweight
    order = np.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    starts = np.flatnonzero(np.concatenate([np.ones(1, bool), sorted_ids[1:] != sorted_ids[:-1]]))
    dweight[sorted_ids[starts]] = np.add.reduceat(d2[order], starts, axis=0)
    return None, dweight


# ---- layer norm ---------------------------------------------------------------------------


def layer_norm_forward(x, scale, shift, eps=1e-5):
    check_float(x, "layer_norm")
    # x: (N..., C)  scale, shift: (C,)  ->  (N..., C); biased variance, as torch and the book.
    # Rows are independent: blocks of rows go to the cores (on a GPU: a warp per row, cuda.py).
    if cuda.kernels_on(backend.device_of(x)):
        return _with_kernel(cuda.layer_norm_forward, cuda.layer_norm_backward, x, scale, shift, eps)
    xp = xp_of(x)
    x2 = x.reshape(-1, x.shape[-1])
    xhat, out = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((x2.shape[0], 1), x2.dtype)
    cpu.parallel_map(_layer_norm_forward_rows, [(x2[r], scale, shift, eps, xhat[r], rstd[r], out[r])
                                                for r in cpu.row_blocks(*x2.shape, xp)], uses_blas=True)
    return out.reshape(x.shape), (xhat, scale, rstd)


def _with_each_row(op, a, vector, out):
    """op(a, vector, out=out) for contiguous (R, C) a and out and a (C,) vector.

    NumPy runs (R, C) op (C,) as R loops of C elements, 2.5x slower than one flat loop. With
    k rows side by side, (R/k, k C) op (the vector k times) makes loops k times longer.
    """
    rows, n = a.shape
    k = math.gcd(rows, 32)
    op(a.reshape(rows // k, k * n), xp_of(a).tile(vector, k), out=out.reshape(rows // k, k * n))


def _row_sums(x):
    # NumPy's x.sum(axis=-1) pays a loop per row: BLAS's x @ ones sums rows of a few hundred
    # three times faster. Long rows (a vocabulary) NumPy sums as fast, and there two threads'
    # concurrent BLAS calls slow each other down by a third.
    if x.shape[-1] > 4096:
        return x.sum(axis=-1)
    return x @ xp_of(x).ones(x.shape[-1], x.dtype)


def _layer_norm_forward_rows(x, scale, shift, eps, xhat, rstd, out):
    # xhat = (x - mean) / sqrt(var + eps), out = xhat * scale + shift (out holds the squares first)
    xp, n = xp_of(x), x.shape[1]
    xp.subtract(x, (_row_sums(x) / n)[:, None], out=xhat)
    xp.multiply(xhat, xhat, out=out)
    rstd[:, 0] = 1.0 / xp.sqrt(_row_sums(out) / n + eps)
    xhat *= rstd
    _with_each_row(xp.multiply, xhat, scale, out)
    _with_each_row(xp.add, out, shift, out)


def layer_norm_backward(dout, cache, needs_grad=(True, True, True)):
    # With xhat = (x - mean) * rstd and out = xhat * scale + shift, the three-term formula:
    #   dxhat = dout * scale
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    # (the two means are how each x moves the row's mean and variance);
    #   dscale = sum over rows of dout * xhat,  dshift = sum over rows of dout.
    # needs_grad (x, scale, shift): the first LayerNorm after a frozen part needs no dx.
    if isinstance(cache, _KernelCache):
        return cache.backward(dout, cache.cache, needs_grad)
    xhat, scale, rstd = cache
    xp = xp_of(xhat)
    d2 = dout.reshape(xhat.shape)
    if not needs_grad[0]:
        column_sums = xp.ones(d2.shape[0], d2.dtype)
        return (None, column_sums @ (d2 * xhat) if needs_grad[1] else None,
                column_sums @ d2 if needs_grad[2] else None)
    dx = xp.empty_like(xhat)
    partial_sums = cpu.parallel_map(_layer_norm_backward_rows, [(d2[r], xhat[r], scale, rstd[r], dx[r])
                                                                for r in cpu.row_blocks(*xhat.shape, xp)],
                                    uses_blas=True)
    no_rows = xp.zeros(xhat.shape[1], xhat.dtype)  # the sums' start, and the whole of them for no rows
    dscale = sum((block_dscale for block_dscale, _ in partial_sums), no_rows)
    dshift = sum((block_dshift for _, block_dshift in partial_sums), no_rows)
    return dx.reshape(dout.shape), dscale if needs_grad[1] else None, dshift if needs_grad[2] else None


def _layer_norm_backward_rows(dout, xhat, scale, rstd, dx):
    # One block of rows: writes dx, returns this block's share of dscale and dshift. The
    # row sums of dxhat and dxhat * xhat are dout @ scale and (dout * xhat) @ scale.
    xp, (rows, n) = xp_of(dout), dout.shape
    dout_xhat = dout * xhat
    column_sums = xp.ones(rows, dout.dtype)
    dscale, dshift = column_sums @ dout_xhat, column_sums @ dout
    mean_dxhat, mean_dxhat_xhat = (dout @ scale) / n, (dout_xhat @ scale) / n
    _with_each_row(xp.multiply, dout, scale, dx)
    xp.multiply(xhat, mean_dxhat_xhat[:, None], out=dout_xhat)
    dx -= dout_xhat
    dx -= mean_dxhat[:, None]
    dx *= rstd
    return dscale, dshift


# ---- GELU ---------------------------------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    check_float(x, "gelu")
    if cuda.kernels_on(backend.device_of(x)):
        return _with_kernel(cuda.gelu_forward, cuda.gelu_backward, x)
    # The tanh approximation GPT-2 uses: 0.5 x (1 + tanh(c (x + a x^3))), c = sqrt(2/pi),
    # over cache-sized blocks on every core.
    xp = xp_of(x)
    flat = x.reshape(-1)
    t, out = xp.empty_like(flat), xp.empty_like(flat)
    cpu.parallel_map(_gelu_forward_block, [(flat[b], t[b], out[b]) for b in cpu.row_blocks(flat.size, 1, xp)])
    return out.reshape(x.shape), (x, t.reshape(x.shape))


def _gelu_forward_block(x, t, out):
    # t = tanh(c (x + a x^3)) (kept for the backward pass), out = 0.5 x (1 + t)
    xp = xp_of(x)
    xp.multiply(x, x, out=t)
    t *= _GELU_A
    t += 1.0
    t *= x
    t *= _GELU_C
    xp.tanh(t, out=t)
    xp.add(t, 1.0, out=out)
    out *= x
    out *= 0.5


def gelu_backward(dout, cache):
    if isinstance(cache, _KernelCache):
        return cache.backward(dout, cache.cache)
    x, t = cache
    xp = xp_of(x)
    flat, dx = x.reshape(-1), xp.empty(x.size, x.dtype)
    t, dout = t.reshape(-1), dout.reshape(-1)
    cpu.parallel_map(_gelu_backward_block,
                     [(flat[b], t[b], dout[b], dx[b]) for b in cpu.row_blocks(flat.size, 1, xp)])
    return (dx.reshape(x.shape),)


def _gelu_backward_block(x, t, dout, dx):
    # With u = c (x + a x^3) and t = tanh(u):
    #   d/dx [0.5 x (1 + t)] = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)
    xp = xp_of(x)
    xp.multiply(x, x, out=dx)
    dx *= 3 * _GELU_A
    dx += 1.0
    dx *= _GELU_C * 0.5
    dx *= x
    dx *= 1.0 - t * t
    dx += 0.5 * (1.0 + t)
    dx *= dout


# ---- softmax and log-softmax ---------------------------------------------------------------


def _over_rows(fn, axis, *arrays):
    """out shaped like the last array, written by fn(*row_blocks, out_block) with `axis`
    moved last, over blocks of rows on every core.

    The functions below reduce along the last axis, so rows are independent. When that
    axis is not the contiguous last one the whole array is one block.
    """
    xp = xp_of(arrays[0])
    out = xp.empty_like(arrays[-1])
    moved = [xp.moveaxis(a, axis, -1) for a in (*arrays, out)]
    if not all(m.flags.c_contiguous for m in moved):
        fn(*moved)
        return out
    rows = [m.reshape(-1, m.shape[-1]) for m in moved]
    cpu.parallel_map(fn, [tuple(r[block] for r in rows) for block in cpu.row_blocks(*rows[0].shape, xp)])
    return out


_EXP_RANGE = 64.0  # e^64 ~ 6e27 and e^-64 ~ 2e-28: normal numbers even in float32


def _exp_shifted(x, out, bias=None, allowed=None):
    """out = exp(x + bias - shift), returning the shift: 0, one number, or one per row (..., 1).

    softmax(x) = softmax(x - c) and logsumexp(x) = c + logsumexp(x - c) for any c per row;
    c must only keep exp() from overflowing and a row from underflowing to all zeros. The
    row maximum always does, but finding it and subtracting it are the two slowest passes
    of a softmax (a NumPy loop per row). When the values allow, one number does as well:
    0 when all lie within +-64, else the block's maximum when all lie within 64 of it.
    (inf and NaN fail both tests and take the row maximum, as torch does.)
    bias: an optional mask of 0 and -inf (attention's causal mask), with `allowed` its 1s
    and 0s; on the fast paths exp() is taken unmasked and multiplied by `allowed`.
    """
    xp = xp_of(x)
    if xp is not np:
        # On a GPU the tests below would each wait for the device: take the row maximum.
        return _exp_shifted_by_row_max(x, out, bias)
    low, high = x.min(), x.max()
    if -_EXP_RANGE <= low and high <= _EXP_RANGE:
        shift = 0.0
        xp.exp(x, out=out)
    elif high - low <= _EXP_RANGE:
        shift = high
        xp.subtract(x, shift, out=out)
        xp.exp(out, out=out)
    else:
        return _exp_shifted_by_row_max(x, out, bias)
    if allowed is not None:
        out *= allowed
    return shift


def _exp_shifted_by_row_max(x, out, bias):
    xp = xp_of(x)
    if bias is not None:
        x = xp.add(x, bias, out=out)  # masked scores become -inf before the row maximum
    shift = x.max(axis=-1, keepdims=True)
    xp.subtract(x, shift, out=out)
    xp.exp(out, out=out)
    return shift


def softmax_forward(x, axis=-1):
    check_float(x, "softmax")
    out = _over_rows(_softmax_rows, axis, x)
    return out, (out, axis)


def _softmax_rows(x, out):
    _exp_shifted(x, out)
    out *= (1.0 / _row_sums(out))[..., None]


def softmax_backward(dout, cache):
    y, axis = cache
    return (_over_rows(_softmax_backward_rows, axis, dout, y),)


def _softmax_backward_rows(dout, y, dx):
    # y = softmax(x)  =>  dx = y * (dout - sum(dout * y))   (the Jacobian diag(y) - y y^T applied)
    xp = xp_of(y)
    xp.multiply(dout, y, out=dx)
    xp.subtract(dout, _row_sums(dx)[..., None], out=dx)
    dx *= y


def log_softmax_forward(x, axis=-1):
    check_float(x, "log_softmax")
    out = _over_rows(_log_softmax_rows, axis, x)
    return out, (out, axis)


def _logsumexp(x, scratch):
    # logsumexp(x) = shift + log(sum(exp(x - shift))) per row, as (..., 1); scratch takes the exps
    return _exp_shifted(x, scratch) + xp_of(x).log(_row_sums(scratch)[..., None])


def _log_softmax_rows(x, out):
    # log softmax(x) = x - logsumexp(x)
    xp_of(x).subtract(x, _logsumexp(x, out), out=out)


def log_softmax_backward(dout, cache):
    y, axis = cache
    return (_over_rows(_log_softmax_backward_rows, axis, dout, y),)


def _log_softmax_backward_rows(dout, y, dx):
    # y = x - logsumexp(x)  =>  dx = dout - softmax(x) * sum(dout), with softmax(x) = exp(y)
    xp = xp_of(y)
    xp.exp(y, out=dx)
    dx *= -_row_sums(dout)[..., None]
    dx += dout


# ---- cross-entropy --------------------------------------------------------------------------


def _logsumexp_rows(z, out):
    out[...] = _logsumexp(z, xp_of(z).empty_like(z))[:, 0]


def _cross_entropy_grad_rows(z, lse, targets, weight, out):
    # out[i] = (softmax(z[i]) - onehot(targets[i])) * weight[i], with softmax(z) = exp(z - lse):
    # z - lse <= 0 and the row's maximum gives at least exp(-log V), so exp() is safe as it is.
    xp = xp_of(z)
    xp.subtract(z, lse[:, None], out=out)
    xp.exp(out, out=out)
    out[xp.arange(len(out)), targets] -= 1.0
    out *= weight[:, None]


def cross_entropy_forward(logits, targets, ignore_index=-100):
    # logits: (N..., V)  targets: (N...) integers  ->  scalar mean over the targets kept
    xp = xp_of(logits)
    targets = targets.data if isinstance(targets, Tensor) else targets
    targets = targets if backend.device_of(targets) == "cuda" else np.asarray(targets)
    vocab = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {targets.shape} do not match logits of shape "
                         f"{logits.shape} (expected {logits.shape[:-1]})")
    z = logits.reshape(-1, vocab)
    # Host targets are checked on the host, then copied once; the count of kept targets
    # stays on the device (no sync).
    t = targets.reshape(-1)
    check_token_ids(xp_of(t).where(t != ignore_index, t, 0), vocab, what="target")
    t = backend.to_device(t, backend.device_of(logits))
    if cuda.kernels_on(backend.device_of(logits)):  # the loss in one pass over the logits, a block per row
        return _with_kernel(cuda.cross_entropy_forward, cuda.cross_entropy_backward, logits, t, ignore_index)
    kept = t != ignore_index
    safe_t = xp.where(kept, t, 0)
    # -log softmax(z)[t] = logsumexp(z) - z[t]. The logits are the largest array of a
    # training step (N x 50257): blocks of rows on every core keep exp() in the cache,
    # and nothing of their size is stored for the backward pass.
    lse = xp.empty(z.shape[0], z.dtype)
    cpu.parallel_map(_logsumexp_rows, [(z[rows], lse[rows]) for rows in cpu.row_blocks(*z.shape, xp)])
    nll = lse - z[xp.arange(z.shape[0]), safe_t]
    n_kept = kept.sum()
    count = xp.maximum(n_kept, 1).astype(z.dtype)
    loss = xp.where(n_kept > 0, xp.where(kept, nll, 0).sum() / count, z.dtype.type(np.nan))
    return xp.asarray(loss, dtype=logits.dtype), (logits, lse, safe_t, kept, count)


def cross_entropy_backward(dout, cache):
    # loss = mean over kept rows of -log softmax(z)[t]  =>  dz = (softmax(z) - onehot(t)) / n_kept
    # on kept rows, 0 on ignored ones; the softmax is recomputed from the logits and lse.
    if isinstance(cache, _KernelCache):
        return cache.backward(dout, cache.cache)
    logits, lse, targets, kept, count = cache
    xp = xp_of(logits)
    z = logits.reshape(-1, logits.shape[-1])
    weight = (kept * (dout / count)).astype(z.dtype)
    dz = xp.empty_like(z)
    cpu.parallel_map(_cross_entropy_grad_rows, [(z[rows], lse[rows], targets[rows], weight[rows], dz[rows])
                                                for rows in cpu.row_blocks(*z.shape, xp)])
    return dz.reshape(logits.shape), None


def token_log_probs_forward(logits, targets):
    # logits: (N..., V)  targets: (N...) integers  ->  (N...) log softmax(logits)[target] per position.
    # Cross-entropy without the mean: log p(t) = z[t] - logsumexp(z). Only (N,) numbers are
    # kept, never the (N, V) log-probabilities a log_softmax and a gather would store.
    check_float(logits, "token_log_probs")
    xp = xp_of(logits)
    targets = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
    vocab = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_log_probs: targets of shape {targets.shape} do not match logits of shape "
                         f"{logits.shape} (expected {logits.shape[:-1]})")
    z, t = logits.reshape(-1, vocab), check_token_ids(targets.reshape(-1), vocab, what="target")
    lse = xp.empty(z.shape[0], z.dtype)
    cpu.parallel_map(_logsumexp_rows, [(z[rows], lse[rows]) for rows in cpu.row_blocks(*z.shape, xp)])
    out = z[xp.arange(z.shape[0]), t] - lse
    return out.reshape(targets.shape), (logits, lse, t)


def token_log_probs_backward(dout, cache):
    # d log p(t) / dz = onehot(t) - softmax(z) = -(softmax(z) - onehot(t)): the cross-entropy
    # gradient rows, weighted by -dout per position.
    logits, lse, targets = cache
    xp = xp_of(logits)
    z = logits.reshape(-1, logits.shape[-1])
    weight = -dout.reshape(-1).astype(z.dtype)
    dz = xp.empty_like(z)
    cpu.parallel_map(_cross_entropy_grad_rows, [(z[rows], lse[rows], targets[rows], weight[rows], dz[rows])
                                                for rows in cpu.row_blocks(*z.shape, xp)])
    return dz.reshape(logits.shape), None


# ---- log-sigmoid ----------------------------------------------------------------------------


def log_sigmoid_forward(x):
    # log sigmoid(x) = -log(1 + e^-x) = min(x, 0) - log(1 + e^-|x|): the exponent is never
    # positive, so nothing overflows, and log1p keeps the tiny values for large |x|.
    check_float(x, "log_sigmoid")
    xp = xp_of(x)
    e = xp.exp(-xp.abs(x))  # (N...) in (0, 1]
    return xp.minimum(x, 0) - xp.log1p(e), (x, e)


def log_sigmoid_backward(dout, cache):
    # d/dx log sigmoid(x) = 1 - sigmoid(x) = sigmoid(-x), with e = e^-|x|:
    #   x >= 0: e^-x / (1 + e^-x) = e / (1 + e);   x < 0: 1 / (1 + e^x) = 1 / (1 + e)
    x, e = cache
    xp = xp_of(x)
    return (dout * xp.where(x >= 0, e, 1.0) / (1.0 + e),)


# ---- attention ------------------------------------------------------------------------------


def causal_mask(t_query, t_key, xp=np):
    """True where a query may not look: key positions after the query's own.

    The queries are the last `t_query` of `t_key` positions (with a KV cache the keys
    include earlier tokens), so query i sits at position t_key - t_query + i.
    """
    return xp.triu(xp.ones((t_query, t_key), dtype=bool), k=t_key - t_query + 1)


@functools.lru_cache(maxsize=16)
def _causal_bias(t_query, t_key, dtype, xp):
    """The causal mask as an additive bias (0 or -inf) and as 1s and 0s, (T, S) in `dtype`.

    Built on the arrays' device once per shape and kept: attention calls with the same
    shape (every layer of every step) share them.
    """
    masked = causal_mask(t_query, t_key, xp)
    return xp.where(masked, dtype.type(-np.inf), dtype.type(0)), (~masked).astype(dtype)


def dropout_mask(shape, p, device):
    """Boolean keep-mask dropping each element with probability p, from the seeded generator.

    Each element takes 32 random bits and is dropped when they fall below p * 2^32. On the
    CPU the bits are drawn (half of one 64-bit draw each, twice as fast as drawing a float).
    On a GPU they are made there, with nothing drawn on or copied from the host: element i
    gets a hash of (key, i), the key one 32-bit number from the seeded generator per mask.
    """
    threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
    if device == "cpu":
        n = math.prod(shape)
        bits = backend.generator().bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
        return (bits >= threshold).reshape(shape)
    key = np.uint32(backend.generator().integers(2**32, dtype=np.uint64))
    if cuda.kernels_on(device):
        return cuda.dropout_keep_mask(shape, key, threshold)
    return counter_hash_bits(shape, key, backend.module_for(device)) >= threshold


def _mix32(x, xp):
    # A 32-bit integer hash (the "lowbias32" constants of Chris Wellons' hash-prospector):
    # every input bit flips about half of the output bits. In place on uint32 x.
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def counter_hash_bits(shape, key, xp=np):
    """32 pseudo-random bits per element, mix(mix(i) + key) for the flat index i: a
    counter-based generator, the same on NumPy and CuPy (and in cuda.py's kernel).

    The inner mix spreads neighbouring indices apart before the key is added, so masks with
    different keys are not shifted copies of one another.
    """
    x = _mix32(xp.arange(math.prod(shape), dtype=np.uint32), xp)
    x += np.uint32(key)
    return _mix32(x, xp).reshape(shape)


def scaled_dot_product_attention_forward(q, k, v, causal=True, dropout_p=0.0, mask=None):
    check_float(q, "scaled_dot_product_attention")
    # q: (B, H, T, D)  k, v: (B, H, S, D)  ->  (B, H, T, D); the heads are independent, so
    # blocks of heads go to the cores (_attention_forward_heads).
    # mask: optional bool array broadcastable to (B, H, T, S), True where a query may not look
    # (besides the causal mask); every query must keep at least one key.
    xp = xp_of(q)
    (B, H, T, D), S = q.shape, k.shape[-2]
    # Scaling q (B, H, T, D) costs a quarter of scaling the scores (B, H, T, S).
    q = q * q.dtype.type(1.0 / math.sqrt(D))
    if mask is None:
        # A single query at the end of the keys (a KV-cache step) may look at all of them.
        bias, allowed = _causal_bias(T, S, q.dtype, xp) if causal and T > 1 else (None, None)
    else:
        # An extra mask (a left-padded batch's pads), made on the arrays' device per call.
        mask = backend.to_device(mask, backend.device_of(q))
        masked = causal_mask(T, S, xp) | mask if causal and T > 1 else mask
        bias, allowed = xp.where(masked, q.dtype.type(-np.inf), q.dtype.type(0)), (~masked).astype(q.dtype)
    keep = dropout_mask((B, H, T, S), dropout_p, backend.device_of(q)) if dropout_p > 0.0 else None
    if mask is None and cuda.kernels_on(backend.device_of(q)):  # the causal mask by index, in the softmax kernel
        return _with_kernel(cuda.scaled_dot_product_attention_forward, cuda.scaled_dot_product_attention_backward,
                            q, k, v, causal, dropout_p, keep)
    att, out = xp.empty((B, H, T, S), q.dtype), xp.empty_like(q)
    cpu.parallel_map(_attention_forward_heads,
                     [(q[:, h], k[:, h], v[:, h], bias, allowed, None if keep is None else keep[:, h], dropout_p,
                       att[:, h], out[:, h])
                      for h in _head_blocks(att, xp)], uses_blas=True)
    return out, (q, k, v, att, out, keep, dropout_p)


def _head_blocks(att, xp):
    """Slices of the heads axis: one per thread when the (B, H, T, S) weights are worth it."""
    worth_it = xp is np and att.size >= cpu.BLOCK
    return cpu.pieces(att.shape[1], cpu.get_num_threads() if worth_it else 1)


def _attention_forward_heads(q, k, v, bias, allowed, keep, dropout_p, att, out):
    # q: (B, h, T, D) already scaled by 1/sqrt(D)  k, v: (B, h, S, D)  ->  att = P, out
    xp = xp_of(q)
    xp.matmul(q, k.swapaxes(-1, -2), out=att)  # scores (B, h, T, S)
    # The causal mask zeroes the weights of later keys; every row keeps its own position.
    _exp_shifted(att, att, bias, allowed)
    att *= (1.0 / _row_sums(att))[..., None]
    if keep is None:
        xp.matmul(att, v, out=out)
    else:
        # Inverted dropout on the weights; the 1/(1-p) goes on (B, h, T, D), not on (B, h, T, S).
        xp.matmul(att * keep, v, out=out)
        out *= out.dtype.type(1.0 / (1.0 - dropout_p))


def scaled_dot_product_attention_backward(dout, cache):
    if isinstance(cache, _KernelCache):
        return cache.backward(dout, cache.cache)
    q, k, v, att, out, keep, dropout_p = cache
    xp = xp_of(q)
    dq, dk, dv = xp.empty_like(q), xp.empty(k.shape, q.dtype), xp.empty(v.shape, q.dtype)
    cpu.parallel_map(_attention_backward_heads,
                     [(dout[:, h], q[:, h], k[:, h], v[:, h], att[:, h], out[:, h],
                       None if keep is None else keep[:, h], dropout_p, dq[:, h], dk[:, h], dv[:, h])
                      for h in _head_blocks(att, xp)], uses_blas=True)
    return dq, dk, dv


def _attention_backward_heads(dout, q, k, v, att, out, keep, dropout_p, dq, dk, dv):
    # out = P' v with P' = keep * P / (1 - p), P = softmax(s), s = q' k^T, q' = q / sqrt(D):
    #   dv = P'^T dout,  dP' = dout v^T,  dP = dP' * keep / (1 - p),
    #   ds = P * (dP - sum_j dP_ij P_ij)  (softmax backward, per row),
    #   dq = ds k / sqrt(D),  dk = ds^T q'
    # The row term is sum_j (dout_i . v_j) P'_ij = dout_i . out_i (FlashAttention's D_i,
    # dropout included): a sum over D elements of (B, h, T, D), not over S of (B, h, T, S).
    # The 1/(1-p) is applied to dout (B, h, T, D) rather than to the (B, h, T, S) weights.
    xp = xp_of(q)
    row_term = _row_sums(dout * out)[..., None]  # (B, h, T, 1)
    if keep is None:
        dropped = att
    else:
        dropped = att * keep
        dout = dout * dout.dtype.type(1.0 / (1.0 - dropout_p))
    xp.matmul(dropped.swapaxes(-1, -2), dout, out=dv)
    datt = dout @ v.swapaxes(-1, -2)
    if keep is not None:
        datt *= keep
    datt -= row_term
    datt *= att
    xp.matmul(datt, k, out=dq)
    dq *= dq.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    xp.matmul(datt.swapaxes(-1, -2), q, out=dk)


# ---- dropout --------------------------------------------------------------------------------


def dropout_forward(x, p):
    # out = x * keep / (1 - p): inverted dropout keeps each element's expected value
    keep = dropout_mask(x.shape, p, backend.device_of(x))
    scale = x.dtype.type(1.0 / (1.0 - p))
    out = x * keep
    out *= scale
    return out, (keep, scale)


def dropout_backward(dout, cache):
    # The same mask and scale: dx = dout * keep / (1 - p)
    keep, scale = cache
    dx = dout * keep
    dx *= scale
    return (dx,)


# ---- the public ops (Tensors in, Tensor out) ------------------------------------------------

linear = fused(linear_forward, linear_backward, "linear", skips_grads=True)
_lora_linear = fused(lora_linear_forward, lora_linear_backward, "lora_linear", skips_grads=True)
embedding = fused(embedding_forward, embedding_backward, "embedding")
unpack_rows = fused(unpack_rows_forward, unpack_rows_backward, "unpack_rows")
_layer_norm = fused(layer_norm_forward, layer_norm_backward, "layer_norm", skips_grads=True)
gelu = fused(gelu_forward, gelu_backward, "gelu")
_softmax = fused(softmax_forward, softmax_backward, "softmax")
_log_softmax = fused(log_softmax_forward, log_softmax_backward, "log_softmax")
_cross_entropy = fused(cross_entropy_forward, cross_entropy_backward, "cross_entropy")
_token_log_probs = fused(token_log_probs_forward, token_log_probs_backward, "token_log_probs")
log_sigmoid = fused(log_sigmoid_forward, log_sigmoid_backward, "log_sigmoid")
_attention = fused(scaled_dot_product_attention_forward, scaled_dot_product_attention_backward,
                   "scaled_dot_product_attention")
_dropout = fused(dropout_forward, dropout_backward, "dropout")


def lora_linear(x, weight, bias, lora_A, lora_B, scale):
    """x W^T + b + scale (x A) B as one op: a Linear with a LoRA adapter (appendix E).

    Only the inputs that require grad get a gradient, and only theirs are computed: with
    W and b frozen, as LoRA trains them, a backward pass costs dx, dA and dB.
    """
    return _lora_linear(x, weight, bias, lora_A, lora_B, scale=scale)


def layer_norm(x, scale, shift, eps=1e-5):
    return _layer_norm(x, scale, shift, eps=eps)


def softmax(x, axis=-1):
    return _softmax(x, axis=axis)


def log_softmax(x, axis=-1):
    return _log_softmax(x, axis=axis)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood of `targets` under softmax(`logits`), skipping ignore_index."""
    return _cross_entropy(logits, targets, ignore_index=ignore_index)


def token_log_probs(logits, targets):
    """log softmax(logits)[..., target] at every position: logits (N..., V), int targets (N...) -> (N...)."""
    return _token_log_probs(logits, targets)


def scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.0):
    return _attention(q, k, v, causal=causal, dropout_p=dropout_p)


def dropout(x, p, training=True):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return _dropout(x, p)
