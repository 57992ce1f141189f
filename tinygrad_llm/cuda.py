"""Fused CUDA kernels for the GPU path, one CuPy RawModule of plain CUDA C++.

Each op has the contract of its NumPy twin in functional.py, `*_forward(...) -> (out,
cache)` and `*_backward(dout, cache) -> grads`, and makes one or two passes over memory
where CuPy's array ops make many: GELU (9 passes -> 1 each way), LayerNorm (a warp per
row), cross-entropy (the loss and the gradient over the vocabulary one pass each, no
logits-sized scratch), attention's scale-mask-softmax (the causal mask by index, no mask
array) and its backward with FlashAttention's D_i = rowsum(dO * O), the dropout mask
(the counter hash of functional.counter_hash_bits), and AdamW (one kernel per parameter).

functional.py runs them when the arrays are on a GPU and TINYGRAD_LLM_CUDA_KERNELS is not
"0" (read at every call, so one process can time both paths); with "0" the same ops run
as CuPy array code. TINYGRAD_LLM_TF32=1 lets cuBLAS round matmul inputs to TF32 (10-bit
mantissa, ~1e-3 relative error; off by default): backend.py turns on CuPy's CUPY_TF32 for
the 2-D products, `matmul` below calls cuBLAS for the batched ones. CuPy is imported only when a kernel is
first used; NVRTC compiles the module once and CuPy keeps it under CUPY_CACHE_DIR.
"""
import functools
import math
import os

import numpy as np

from . import backend

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_KERNELS = ("gelu_forward_kernel", "gelu_backward_kernel", "layer_norm_forward_kernel",
            "layer_norm_backward_kernel", "layer_norm_param_grads_kernel", "cross_entropy_forward_kernel",
            "cross_entropy_backward_kernel", "causal_softmax_forward_kernel", "softmax_backward_kernel",
            "embedding_backward_kernel", "adamw_kernel")
# The template instances NVRTC compiles (CuPy's name expressions), plus the untemplated mask kernel.
NAME_EXPRESSIONS = tuple(f"{name}<{c_type}>" for name in _KERNELS for c_type in _C_TYPES.values()) \
    + ("dropout_keep_kernel",)

SOURCE = r"""
template <typename T> __device__ T negative_infinity();
template <> __device__ float negative_infinity<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ double negative_infinity<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

template <typename T> __device__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename T> __device__ T warp_max(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The sum or maximum over a block (a multiple of 32 threads), returned to every thread.
template <typename T> __device__ T block_reduce(T v, bool is_max, T* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();  // shared may still be read from the previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    T identity = is_max ? negative_infinity<T>() : T(0);
    v = threadIdx.x < warps ? shared[threadIdx.x] : identity;
    v = is_max ? warp_max(v) : warp_sum(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}

// ---- GELU, tanh approximation: out = 0.5 x (1 + tanh(u)), u = c (x + a x^3) ------------------

template <typename T>
__global__ void gelu_forward_kernel(const T* x, T* out, long long n) {
    const T c = T(0.7978845608028654), a = T(0.044715);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T xi = x[i];
        out[i] = T(0.5) * xi * (T(1) + tanh(c * (xi + a * xi * xi * xi)));
    }
}

// d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(u)
template <typename T>
__global__ void gelu_backward_kernel(const T* x, const T* dout, T* dx, long long n) {
    const T c = T(0.7978845608028654), a = T(0.044715);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T xi = x[i];
        T t = tanh(c * (xi + a * xi * xi * xi));
        dx[i] = dout[i] * (T(0.5) * (T(1) + t) + T(0.5) * xi * (T(1) - t * t) * c * (T(1) + T(3) * a * xi * xi));
    }
}

// ---- LayerNorm: one warp per row of C ---------------------------------------------------------

template <typename T>
__global__ void layer_norm_forward_kernel(const T* x, const T* scale, const T* shift, T* out, T* mean, T* rstd,
                                          int rows, int C, T eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together
    const T* xr = x + (long long)row * C;
    T sum = 0;
    for (int c = lane; c < C; c += 32) sum += xr[c];
    T m = warp_sum(sum) / C;
    T squares = 0;
    for (int c = lane; c < C; c += 32) { T d = xr[c] - m; squares += d * d; }
    T r = T(1) / sqrt(warp_sum(squares) / C + eps);  // biased variance, as torch
    T* outr = out + (long long)row * C;
    for (int c = lane; c < C; c += 32) outr[c] = (xr[c] - m) * r * scale[c] + shift[c];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dout scale
template <typename T>
__global__ void layer_norm_backward_kernel(const T* dout, const T* x, const T* scale, const T* mean, const T* rstd,
                                           T* dx, int rows, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* dr = dout + (long long)row * C;
    const T* xr = x + (long long)row * C;
    T m = mean[row], r = rstd[row], sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int c = lane; c < C; c += 32) {
        T dxhat = dr[c] * scale[c];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * (xr[c] - m) * r;
    }
    T mean_dxhat = warp_sum(sum_dxhat) / C, mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
    T* dxr = dx + (long long)row * C;
    for (int c = lane; c < C; c += 32)
        dxr[c] = r * (dr[c] * scale[c] - mean_dxhat - (xr[c] - m) * r * mean_dxhat_xhat);
}

// dscale and dshift, column sums over rows: a thread per column and chunk of rows writes
// partial sums (chunks, C); the caller adds the chunks. No atomics: the same bits every run.
template <typename T>
__global__ void layer_norm_param_grads_kernel(const T* dout, const T* x, const T* mean, const T* rstd,
                                              T* dscale_partial, T* dshift_partial, int rows, int C, int rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (c >= C) return;
    int first = chunk * rows_per_chunk, last = min(rows, first + rows_per_chunk);
    T dscale = 0, dshift = 0;
    for (int row = first; row < last; ++row) {
        long long i = (long long)row * C + c;
        dscale += dout[i] * (x[i] - mean[row]) * rstd[row];
        dshift += dout[i];
    }
    dscale_partial[(long long)chunk * C + c] = dscale;
    dshift_partial[(long long)chunk * C + c] = dshift;
}

// ---- softmax cross-entropy over the vocabulary: a block per row --------------------------------

// lse = logsumexp(z) from each thread's running (max, sum) pair, nll = lse - z[target] (0 if ignored)
template <typename T>
__global__ void cross_entropy_forward_kernel(const T* z, const long long* targets, const bool* kept, T* lse, T* nll,
                                             int V) {
    __shared__ T shared[32];
    const T* zr = z + (long long)blockIdx.x * V;
    T m = negative_infinity<T>(), s = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        T v = zr[j];
        if (v > m) { s = s * exp(m - v) + T(1); m = v; }
        else if (m != negative_infinity<T>()) s += exp(v - m);
    }
    T row_max = block_reduce(m, true, shared);
    T own = m == negative_infinity<T>() ? T(0) : s * exp(m - row_max);
    T total = block_reduce(own, false, shared);
    if (threadIdx.x == 0) {
        T l = row_max + log(total);
        lse[blockIdx.x] = l;
        nll[blockIdx.x] = kept[blockIdx.x] ? l - zr[targets[blockIdx.x]] : T(0);
    }
}

// dz = (softmax(z) - onehot(target)) * weight, weight = dloss / count on kept rows, 0 on ignored ones
template <typename T>
__global__ void cross_entropy_backward_kernel(const T* z, const T* lse, const long long* targets, const bool* kept,
                                              const T* dloss_over_count, T* dz, int V) {
    long long offset = (long long)blockIdx.x * V;
    T weight = kept[blockIdx.x] ? dloss_over_count[0] : T(0), l = lse[blockIdx.x];
    long long target = targets[blockIdx.x];
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        dz[offset + j] = (exp(z[offset + j] - l) - (j == target ? T(1) : T(0))) * weight;
}

// ---- attention's softmax over scores (B, H, T, S): a warp per row -----------------------------

// In place: P = softmax over the keys a query may see (causal: key j <= i + S - T), 0 elsewhere.
template <typename T>
__global__ void causal_softmax_forward_kernel(T* att, long long rows, int T_query, int S, int causal) {
    long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    T* a = att + row * S;
    int last = causal ? (int)(row % T_query) + S - T_query : S - 1;
    T m = negative_infinity<T>();
    for (int j = lane; j <= last; j += 32) m = fmax(m, a[j]);
    m = warp_max(m);
    T s = 0;
    for (int j = lane; j <= last; j += 32) { T e = exp(a[j] - m); a[j] = e; s += e; }
    T inverse = T(1) / warp_sum(s);
    for (int j = lane; j < S; j += 32) a[j] = j <= last ? a[j] * inverse : T(0);
}

// In place over dP = dout' v^T: ds = P * (dP * keep - D_i), D_i = dout_i . out_i per row.
template <typename T>
__global__ void softmax_backward_kernel(T* datt, const T* att, const bool* keep, const T* row_term, long long n, int S) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T d = (keep == nullptr || keep[i]) ? datt[i] : T(0);
        datt[i] = att[i] * (d - row_term[i / S]);
    }
}

// ---- the embedding gradient: dW[v] = sum of dout over the positions holding id v -----------------

// Positions sorted by id; the thread at the first position of each run of equal ids sums the
// run in order, one column each: no atomics, so the same bits every run (a scatter-add's
// order, and so its rounding, changes from run to run).
template <typename T>
__global__ void embedding_backward_kernel(const T* dout, const long long* order, const long long* sorted_ids,
                                          T* dweight, long long N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (long long r = blockIdx.y; r < N; r += gridDim.y) {
        long long id = sorted_ids[r];
        if (r > 0 && sorted_ids[r - 1] == id) continue;  // inside a run: its first position sums it
        T sum = 0;
        for (long long s = r; s < N && sorted_ids[s] == id; ++s) sum += dout[order[s] * C + c];
        dweight[id * C + c] = sum;
    }
}

// ---- the dropout mask: keep = mix(mix(i) + key) >= threshold (functional.counter_hash_bits) ----

__device__ unsigned int mix32(unsigned int x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

extern "C" __global__ void dropout_keep_kernel(bool* keep, long long n, unsigned int key, unsigned int threshold) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        keep[i] = mix32(mix32((unsigned int)i) + key) >= threshold;
}

// ---- AdamW, the arithmetic of optim._adamw_update in its order --------------------------------

// The constants come rounded from the host as NumPy rounds them: 1 - wd lr, 1 - b1, b2, 1 - b2,
// eps c and step_size c with c = sqrt(1 - b2^t).
template <typename T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, long long n, T keep_factor, T one_minus_beta1, T beta2,
                             T one_minus_beta2, T eps_c, T step_size_c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T gi = g[i];
        T pi = p[i] * keep_factor;
        T mi = m[i] + (gi - m[i]) * one_minus_beta1;
        T vi = v[i] * beta2 + gi * gi * one_minus_beta2;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - mi / (sqrt(vi) + eps_c) * step_size_c;
    }
}
"""

THREADS = 256
ROWS_PER_CHUNK = 64  # LayerNorm's parameter gradients: rows summed by one thread


def kernels_on(device):
    """True when `device` is "cuda", CuPy on a GPU (not a stand-in), and TINYGRAD_LLM_CUDA_KERNELS is not "0"."""
    return device == "cuda" and os.environ.get("TINYGRAD_LLM_CUDA_KERNELS", "1") != "0" and backend.cuda_is_cupy()


@functools.cache
def _module():
    cupy = backend.module_for("cuda")
    return cupy.RawModule(code=SOURCE, options=("--std=c++17",), name_expressions=NAME_EXPRESSIONS)


def _kernel(name, dtype=None):
    return _module().get_function(name if dtype is None else f"{name}<{_C_TYPES[np.dtype(dtype)]}>")


def _grid(n):
    return (max(1, min(math.ceil(n / THREADS), 65535 * 8)),)


def _contiguous(*arrays):
    # A RawKernel reads raw pointers and ignores strides.
    cupy = backend.module_for("cuda")
    return [cupy.ascontiguousarray(a) for a in arrays]


# ---- GELU ---------------------------------------------------------------------------------------


def gelu_forward(x):
    # x: any shape; the backward recomputes tanh from x instead of storing it (one array less)
    (x,) = _contiguous(x)
    out = backend.module_for("cuda").empty_like(x)
    _kernel("gelu_forward_kernel", x.dtype)(_grid(x.size), (THREADS,), (x, out, np.int64(x.size)))
    return out, (x,)


def gelu_backward(dout, cache):
    (x,) = cache
    (dout,) = _contiguous(dout)
    dx = backend.module_for("cuda").empty_like(x)
    _kernel("gelu_backward_kernel", x.dtype)(_grid(x.size), (THREADS,), (x, dout, dx, np.int64(x.size)))
    return (dx,)


# ---- LayerNorm ----------------------------------------------------------------------------------


def layer_norm_forward(x, scale, shift, eps=1e-5):
    # x: (N..., C) -> out (N..., C); the cache keeps x, mean and rstd (N,), not xhat
    cupy = backend.module_for("cuda")
    x, scale, shift = _contiguous(x, scale, shift)
    rows, C = x.size // x.shape[-1], x.shape[-1]
    out = cupy.empty_like(x)
    mean, rstd = cupy.empty(rows, x.dtype), cupy.empty(rows, x.dtype)
    warps = THREADS // 32
    _kernel("layer_norm_forward_kernel", x.dtype)((math.ceil(rows / warps),), (THREADS,),
                                                  (x, scale, shift, out, mean, rstd, np.int32(rows), np.int32(C),
                                                   x.dtype.type(eps)))
    return out, (x, scale, mean, rstd)


def layer_norm_backward(dout, cache, needs_grad=(True, True, True)):
    cupy = backend.module_for("cuda")
    x, scale, mean, rstd = cache
    (dout,) = _contiguous(dout)
    rows, C = x.size // x.shape[-1], x.shape[-1]
    dx = None
    if needs_grad[0]:
        dx = cupy.empty_like(x)
        warps = THREADS // 32
        _kernel("layer_norm_backward_kernel", x.dtype)((math.ceil(rows / warps),), (THREADS,),
                                                       (dout, x, scale, mean, rstd, dx, np.int32(rows), np.int32(C)))
    dscale = dshift = None
    if needs_grad[1] or needs_grad[2]:
        chunks = math.ceil(rows / ROWS_PER_CHUNK)
        dscale_partial, dshift_partial = cupy.empty((chunks, C), x.dtype), cupy.empty((chunks, C), x.dtype)
        _kernel("layer_norm_param_grads_kernel", x.dtype)(
            (math.ceil(C / THREADS), chunks), (THREADS,),
            (dout, x, mean, rstd, dscale_partial, dshift_partial, np.int32(rows), np.int32(C), np.int32(ROWS_PER_CHUNK)))
        dscale = dscale_partial.sum(axis=0) if needs_grad[1] else None
        dshift = dshift_partial.sum(axis=0) if needs_grad[2] else None
    return dx, dscale, dshift


# ---- cross-entropy ------------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, ignore_index=-100):
    # logits: (N..., V)  targets: (N...) on the device, already checked  ->  the mean over kept targets
    cupy = backend.module_for("cuda")
    (z,) = _contiguous(logits.reshape(-1, logits.shape[-1]))
    t = targets.reshape(-1)
    kept = t != ignore_index
    (safe_t,) = _contiguous(cupy.where(kept, t, 0).astype(np.int64))
    rows, V = z.shape
    lse, nll = cupy.empty(rows, z.dtype), cupy.empty(rows, z.dtype)
    _kernel("cross_entropy_forward_kernel", z.dtype)((rows,), (THREADS,), (z, safe_t, kept, lse, nll, np.int32(V)))
    n_kept = kept.sum()
    count = cupy.maximum(n_kept, 1).astype(z.dtype)
    loss = cupy.where(n_kept > 0, nll.sum() / count, z.dtype.type(np.nan)).astype(z.dtype)
    return loss, (z, logits.shape, lse, safe_t, kept, count)


def cross_entropy_backward(dout, cache):
    cupy = backend.module_for("cuda")
    z, shape, lse, targets, kept, count = cache
    rows, V = z.shape
    dz = cupy.empty_like(z)
    weight = cupy.asarray(dout / count, dtype=z.dtype).reshape(1)
    _kernel("cross_entropy_backward_kernel", z.dtype)((rows,), (THREADS,), (z, lse, targets, kept, weight, dz, np.int32(V)))
    return dz.reshape(shape), None


# ---- embedding ----------------------------------------------------------------------------------


def embedding_backward(dout, ids, shape, dtype):
    """functional.embedding_backward's dweight on the GPU, summed run by run in id order (no atomics)."""
    cupy = backend.module_for("cuda")
    flat_ids = ids.reshape(-1).astype(np.int64)
    order = cupy.argsort(flat_ids)
    sorted_ids = cupy.ascontiguousarray(flat_ids[order])
    (d2,) = _contiguous(dout.reshape(-1, shape[1]))
    dweight = cupy.zeros(shape, dtype=dtype)
    N, C = d2.shape
    _kernel("embedding_backward_kernel", dtype)((math.ceil(C / THREADS), min(N, 65535)), (THREADS,),
                                                (d2, order, sorted_ids, dweight, np.int64(N), np.int32(C)))
    return dweight


# ---- attention ----------------------------------------------------------------------------------


def dropout_keep_mask(shape, key, threshold):
    """The keep-mask of functional.dropout_mask on the GPU: one pass, no host arrays."""
    keep = backend.module_for("cuda").empty(shape, dtype=bool)
    if keep.size >= 2**32:
        raise ValueError(f"dropout mask of {keep.size} elements: the counter hash covers fewer than 2^32")
    _kernel("dropout_keep_kernel")(_grid(keep.size), (THREADS,), (keep, np.int64(keep.size), np.uint32(key),
                                                                 np.uint32(threshold)))
    return keep


def matmul(a, b):
    """a @ b for stacked matrices; with TINYGRAD_LLM_TF32=1 cuBLAS may round the inputs to TF32.

    CuPy's batched product always computes in strict FP32 (it passes the data type as the
    compute type), so the TF32 path calls cuBLAS's strided batched GEMM itself. cuBLAS is
    column-major: C^T = B^T A^T, so the row-major product is cuBLAS's with A and B swapped.
    """
    cupy = backend.module_for("cuda")
    if os.environ.get("TINYGRAD_LLM_TF32") != "1" or a.dtype != np.float32 or a.ndim < 3 or a.shape[:-2] != b.shape[:-2]:
        return cupy.matmul(a, b)
    from cupy_backends.cuda.libs import cublas
    from cupy_backends.cuda.api import runtime

    a, b = _contiguous(a, b)
    batch, (m, k), n = math.prod(a.shape[:-2]), a.shape[-2:], b.shape[-1]
    out = cupy.empty((*a.shape[:-2], m, n), np.float32)
    one, zero = np.array(1, np.float32), np.array(0, np.float32)
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(), cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, n, m, k, one.ctypes.data,
        b.data.ptr, runtime.CUDA_R_32F, n, k * n, a.data.ptr, runtime.CUDA_R_32F, k, m * k, zero.ctypes.data,
        out.data.ptr, runtime.CUDA_R_32F, n, m * n, batch, cublas.CUBLAS_COMPUTE_32F_FAST_TF32,
        cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    return out


def scaled_dot_product_attention_forward(q, k, v, causal=True, dropout_p=0.0, keep=None):
    # q: (B, H, T, D)  k, v: (B, H, S, D)  keep: the (B, H, T, S) dropout mask or None
    #   s = (q / sqrt(D)) k^T (cuBLAS), P = softmax over allowed keys (one kernel, in place),
    #   out = (keep * P) v / (1 - p)
    (B, H, T, D), S = q.shape, k.shape[-2]
    q = q * q.dtype.type(1.0 / math.sqrt(D))
    att = matmul(q, k.swapaxes(-1, -2))
    rows = B * H * T
    _kernel("causal_softmax_forward_kernel", q.dtype)((math.ceil(rows / (THREADS // 32)),), (THREADS,),
                                                      (att, np.int64(rows), np.int32(T), np.int32(S), np.int32(causal)))
    if keep is None:
        out = matmul(att, v)
    else:
        out = matmul(att * keep, v)
        out *= out.dtype.type(1.0 / (1.0 - dropout_p))
    return out, (q, k, v, att, out, keep, dropout_p)


def scaled_dot_product_attention_backward(dout, cache):
    # As functional's twin: dv = P'^T dout', dP = dout' v^T, ds = P (dP keep - D_i) with
    # D_i = dout_i . out_i (one (B, H, T) sum over D), dq = ds k / sqrt(D), dk = ds^T q'.
    q, k, v, att, out, keep, dropout_p = cache
    row_term = (dout * out).sum(axis=-1)  # (B, H, T)
    if keep is not None:
        dout = dout * dout.dtype.type(1.0 / (1.0 - dropout_p))
    dropped = att if keep is None else att * keep
    dv = matmul(dropped.swapaxes(-1, -2), dout)
    datt = matmul(dout, v.swapaxes(-1, -2))
    datt, row_term = _contiguous(datt, row_term)
    _kernel("softmax_backward_kernel", q.dtype)(_grid(datt.size), (THREADS,),
                                                (datt, att, np.uint64(0) if keep is None else keep, row_term,  # 0: NULL
                                                 np.int64(datt.size), np.int32(att.shape[-1])))
    dq = matmul(datt, k)
    dq *= dq.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    dk = matmul(datt.swapaxes(-1, -2), q)
    return dq, dk, dv


# ---- AdamW --------------------------------------------------------------------------------------


def adamw_update(param, grad, exp_avg, exp_avg_sq, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    """optim._adamw_update in one kernel over flat, contiguous arrays, in place."""
    t = param.dtype.type
    _kernel("adamw_kernel", param.dtype)(
        _grid(param.size), (THREADS,),
        (param, grad, exp_avg, exp_avg_sq, np.int64(param.size), t(1 - decay), t(1 - beta1), t(beta2), t(1 - beta2),
         t(eps * bias_correction2_sqrt), t(step_size * bias_correction2_sqrt)))
