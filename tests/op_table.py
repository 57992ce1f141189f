"""Every differentiable op of tinygrad_llm in one table, each equal to PyTorch's.

In the style of tinygrad's op tests: an op is declared once, with its tinygrad_llm call,
the torch call it must equal, a hypothesis strategy for its inputs and its tolerances
in float64 and float32. `compare_with_torch` runs one drawn case in both libraries and
compares the output and the gradient of every float input; `gradcheck_case` checks the
same call against finite differences. tests/test_ops.py runs every entry all three ways.

A case is a tuple of input arrays and a dict of options. Float inputs become leaves that
require grad; integer inputs (token ids, targets) are passed as integer tensors; the
options are everything else (axis, exponent, index, mask, dropout seed) and reach both
calls unchanged. Values are drawn in float64 and rounded to the dtype under test, so
both libraries see the same numbers.

Tolerances are (rtol, atol) for |ours - torch| <= atol + rtol * |torch|, element by
element. Inputs have magnitudes of order 1 to 10, so atol is the absolute error at that
scale: it covers elements whose exact value is zero or cancels to near zero, where
only absolute accuracy exists. Each entry says why it is what it is.
"""
from dataclasses import dataclass, field

import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis.extra import numpy as hnp

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from reference import ops as ref
from tinygrad_llm import Tensor, backend

# ---- tolerances ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str


# float64: both libraries evaluate the same formula, rounding in a different order; the
# differences are a few ulps (2e-16) times the number of terms a result sums.
F64_ELEMENTWISE = Tolerance(1e-12, 1e-13, "one or two correctly rounded operations per element; "
                                          "gradients from broadcasting sum a handful of terms")
F64_REDUCTION = Tolerance(1e-10, 1e-12, "sums of up to 64 terms in a different order (BLAS blocking, "
                                        "pairwise summation); cancellation can leave a sum far smaller "
                                        "than its terms, so its relative error exceeds an ulp")
F64_FUSED = Tolerance(1e-10, 1e-11, "chains of reductions (row max, row sum, mean, variance) whose "
                                    "rounding reaches every element of the row, amplified by 1/std "
                                    "(LayerNorm, rows of spread >= 0.1) or by exp (softmax)")

# float32: the same orders of rounding at eps = 1.2e-7.
F32_ELEMENTWISE = Tolerance(1e-6, 1e-5, "a few ulps (1.2e-7) per element, transcendental functions "
                                        "differ by an ulp or two between libm and torch's vector code; "
                                        "a broadcast input's gradient sums up to 64 terms of size ~3")
F32_REDUCTION = Tolerance(1e-5, 1e-5, "sums of up to 64 terms of size ~10 in a different order: "
                                      "a few ulps times the length, relative to the largest term")
F32_FUSED = Tolerance(1e-4, 1e-4, "chains of reductions, exp and normalisation: the rounding of "
                                  "a row's statistics reaches every element and is amplified by "
                                  "1/std (LayerNorm) or by exp (softmax, cross-entropy, attention)")

# ---- input strategies --------------------------------------------------------------------


def shapes(min_dims=0, max_dims=3):
    """Array shapes with sides 1 to 4: size-1 sides are common, so is the 0-d scalar."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=4)


def values(shape, low=-3.0, high=3.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_subnormal=False))


def away_from_zero(shape, low=0.5, high=3.0):
    """Values of either sign with |x| in [low, high] (denominators, bases of powers)."""
    sign = hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 1.0]))
    return st.tuples(values(shape, low, high), sign).map(lambda pair: pair[0] * pair[1])


def with_ties(shape):
    """Values drawn half the time from a few integers, so rows often hold equal maxima."""
    return hnp.arrays(np.float64, shape, elements=st.one_of(st.integers(-2, 2).map(float), st.floats(-3, 3)))


def distinct(shape):
    """Values at least 0.01 apart: max has a derivative there, and a finite-difference step
    (1e-6) cannot change which element is the largest."""
    return hnp.arrays(np.float64, shape, elements=st.integers(-300, 300).map(lambda i: i / 100), unique=True)


@dataclass(frozen=True)
class Case:
    inputs: tuple
    options: dict = field(default_factory=dict)

    def __repr__(self):  # what hypothesis prints for a falsifying example
        shapes_ = ", ".join(f"{a.dtype}{list(a.shape)}" for a in self.inputs)
        return f"Case(inputs=[{shapes_}], options={self.options}, values={[a.tolist() for a in self.inputs]})"


def unary(strategy=values, min_dims=0, max_dims=3):
    return shapes(min_dims, max_dims).flatmap(strategy).map(lambda x: Case((x,)))


def binary(left=values, right=values):
    """Two inputs of mutually broadcastable shapes (missing and size-1 dimensions included)."""
    pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4)
    return pairs.flatmap(lambda s: st.tuples(left(s.input_shapes[0]), right(s.input_shapes[1]))).map(Case)


def matmul_cases():
    """Matrix products with NumPy's signature: batch dimensions broadcast, and a 1-D operand
    is a vector (the `?` dimensions may be missing)."""
    shapes_ = hnp.mutually_broadcastable_shapes(signature="(m?,n),(n,p?)->(m?,p?)", max_dims=2, max_side=4)
    return shapes_.flatmap(lambda s: st.tuples(values(s.input_shapes[0]), values(s.input_shapes[1]))).map(Case)


def axis_options(ndim):
    """axis=None, one axis (negative too) or several, each with or without keepdims."""
    axes = [st.none()]
    if ndim:
        axes += [st.integers(-ndim, ndim - 1),
                 st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)]
    return st.fixed_dictionaries({"axis": st.one_of(axes), "keepdims": st.booleans()})


def reduction(strategy=values):
    return shapes().flatmap(lambda s: st.tuples(strategy(s), axis_options(len(s)))).map(
        lambda pair: Case((pair[0],), pair[1]))


@st.composite
def power_cases(draw):
    # Integer exponents work on any base; fractional ones need a positive base.
    exponent = draw(st.sampled_from([2, 3, -1, 0.5, 1.5, -0.5, 2.5]))
    shape = draw(shapes())
    base = draw(away_from_zero(shape, 0.3, 3.0))
    return Case((base if float(exponent).is_integer() else np.abs(base),), {"exponent": exponent})


@st.composite
def scalar_operand_cases(draw):
    # A Python float on either side of the operator, kept in the tensor's dtype.
    return Case((draw(unary(away_from_zero)).inputs[0],), {"scalar": draw(st.floats(-3, 3))})


@st.composite
def reshape_cases(draw):
    shape = draw(shapes())
    factors = [f for n in shape for f in _prime_factors(n)]
    factors = draw(st.permutations(factors))
    cuts = sorted(draw(st.lists(st.integers(0, len(factors)), max_size=3)))
    new_shape = [int(np.prod(factors[lo:hi])) for lo, hi in zip([0, *cuts], [*cuts, len(factors)])]
    if new_shape and draw(st.booleans()):
        new_shape[draw(st.integers(0, len(new_shape) - 1))] = -1
    return Case((draw(values(shape)),), {"shape": tuple(new_shape)})


def _prime_factors(n):
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


@st.composite
def transpose_cases(draw):
    shape = draw(shapes(min_dims=1))
    dims = st.integers(-len(shape), len(shape) - 1)
    return Case((draw(values(shape)),), {"dim0": draw(dims), "dim1": draw(dims)})


@st.composite
def permute_cases(draw):
    shape = draw(shapes(min_dims=1))
    return Case((draw(values(shape)),), {"dims": tuple(draw(st.permutations(range(len(shape)))))})


@st.composite
def index_cases(draw):
    """Basic indices (ints, slices with steps, None), integer arrays with repeats, boolean masks."""
    shape = draw(shapes(min_dims=1))
    kind = draw(st.sampled_from(["basic", "integer array", "integer array after a slice", "boolean mask"]))
    if kind == "basic":
        # torch refuses negative steps, so steps are positive; starts and stops may be negative.
        bound = st.none() | st.integers(-max(shape), max(shape))
        index = [draw(st.integers(-n, n - 1) | st.builds(slice, bound, bound, st.none() | st.integers(1, 3)))
                 for n in shape[:draw(st.integers(1, len(shape)))]]
        if draw(st.booleans()):  # a new axis of size 1
            index.insert(draw(st.integers(0, len(index))), None)
        index = tuple(index)
    elif kind == "boolean mask":
        index = draw(hnp.arrays(bool, shape[:draw(st.integers(1, len(shape)))]))
    else:
        axis = 0 if kind == "integer array" else 1
        if axis >= len(shape):
            shape = (*shape, 2)
        n = shape[axis]
        # More picks than rows, so some row is taken twice: its gradient must add up.
        picks_shape = draw(st.sampled_from([(n + 1,), (2, n + 1)]))
        picks = draw(hnp.arrays(np.int64, picks_shape, elements=st.integers(-n, n - 1)))
        index = (slice(None),) * axis + (picks,)
    return Case((draw(values(shape)),), {"index": index})


def _torch_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    return tuple(torch.as_tensor(i) if isinstance(i, np.ndarray) else i for i in parts)


@st.composite
def concatenate_cases(draw):
    shape = draw(shapes(min_dims=1))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    pieces = []
    for _ in range(draw(st.integers(1, 3))):
        piece_shape = list(shape)
        piece_shape[axis] = draw(st.integers(1, 3))
        pieces.append(draw(values(tuple(piece_shape))))
    return Case(tuple(pieces), {"axis": axis})


@st.composite
def split_cases(draw):
    shape = draw(shapes(min_dims=1))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    size = shape[axis]
    equal_pieces = [n for n in range(1, size + 1) if size % n == 0]
    sections = draw(st.one_of(st.sampled_from(equal_pieces),
                              st.lists(st.integers(1, size), unique=True, max_size=3).map(sorted)))
    return Case((draw(values(shape)),), {"sections": sections, "axis": axis})


@st.composite
def where_cases(draw):
    shapes_ = draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=4)).input_shapes
    condition_shape, a_shape, b_shape = shapes_
    return Case((draw(values(a_shape)), draw(values(b_shape))),
                {"condition": draw(hnp.arrays(bool, condition_shape))})


@st.composite
def masked_fill_cases(draw, fill_values=(0.0, 2.5, -1e9, -np.inf)):
    shape = draw(shapes(min_dims=1))
    # The mask broadcasts to x: it may lack leading dimensions and have size-1 sides.
    mask_shape = tuple(n if draw(st.booleans()) else 1 for n in shape[draw(st.integers(0, len(shape))):])
    return Case((draw(values(shape)),), {"mask": draw(hnp.arrays(bool, mask_shape)),
                                         "value": draw(st.sampled_from(fill_values))})


@st.composite
def unpack_rows_cases(draw):
    keep = draw(hnp.arrays(bool, shapes(2, 2)))
    return Case((draw(values((int(keep.sum()), draw(st.integers(1, 4))))),), {"keep": keep})


def _torch_unpack_rows(x, keep):
    keep = torch.as_tensor(keep)
    out = x.new_zeros((keep.numel(), x.shape[-1])).index_put((keep.reshape(-1),), x)
    return out.reshape(*keep.shape, x.shape[-1])


@st.composite
def linear_cases(draw):
    n_in, n_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    # linear_forward takes another matmul form for at most F.FEW_ROWS rows: both are drawn.
    leading = draw(shapes(0, 2) | st.tuples(st.integers(F.FEW_ROWS + 1, F.FEW_ROWS + 8)))
    x = draw(values(leading + (n_in,)))
    weight = draw(values((n_out, n_in)))
    bias = draw(st.none() | values((n_out,)))
    return Case((x, weight) if bias is None else (x, weight, bias))


@st.composite
def lora_linear_cases(draw, frozen=False):
    """x, W, A, B and an optional bias; `frozen` passes W and b as options, the constants
    LinearWithLoRA sees after freezing, so only x, A and B take gradients."""
    n_in, n_out, rank = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    x = draw(values(draw(shapes(0, 2)) + (n_in,)))
    weight, lora_A, lora_B = draw(values((n_out, n_in))), draw(values((n_in, rank))), draw(values((rank, n_out)))
    bias = draw(st.none() | values((n_out,)))
    scale = draw(st.sampled_from([1.0, 0.5, 2.0, 16 / 3]))  # alpha / rank
    if frozen:
        return Case((x, lora_A, lora_B), {"weight": weight, "bias": bias, "scale": scale})
    return Case((x, weight, lora_A, lora_B) + (() if bias is None else (bias,)), {"scale": scale})


def _lora_linear(x, weight, lora_A, lora_B, *bias, scale):
    return F.lora_linear(x, weight, bias[0] if bias else None, lora_A, lora_B, scale)


def _torch_lora_linear(x, weight, lora_A, lora_B, *bias, scale):
    # reference/lora.py's LinearWithLoRA: linear(x) + (alpha / rank) * (x @ A @ B)
    return torch.nn.functional.linear(x, weight, bias[0] if bias else None) + scale * (x @ lora_A @ lora_B)


def _frozen(array, like):
    """A constant beside the inputs: rounded to their dtype, requiring no gradient."""
    return None if array is None else Tensor(array.astype(like.dtype), device=like.device)


def _torch_frozen(array, like):
    return None if array is None else torch.as_tensor(array, dtype=like.dtype)


@st.composite
def embedding_cases(draw):
    vocab, channels = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    # Ids from a small vocabulary over several positions: repeated ids are the rule.
    ids = draw(hnp.arrays(np.int64, draw(shapes(1, 2)), elements=st.integers(0, vocab - 1)))
    return Case((ids, draw(values((vocab, channels)))))


@st.composite
def layer_norm_cases(draw):
    x = draw(values(draw(shapes(0, 2)) + (draw(st.integers(2, 6)),)))
    channels = x.shape[-1]
    # Rows of spread below 0.1 get a ramp of spread >= 0.29 added: (nearly) constant rows
    # meet eps, which amplifies rounding by up to 1/sqrt(eps); test_autograd.py covers them.
    x += np.where(x.std(axis=-1, keepdims=True) < 0.1, np.linspace(0.0, 1.0, channels), 0.0)
    return Case((x, draw(values((channels,))), draw(values((channels,)))))


@st.composite
def softmax_cases(draw):
    shape = draw(shapes(min_dims=1))
    return Case((draw(values(shape, -20.0, 20.0)),), {"axis": draw(st.integers(-len(shape), len(shape) - 1))})


@st.composite
def cross_entropy_cases(draw):
    vocab = draw(st.integers(2, 6))
    positions = draw(shapes(0, 2))
    ignore_index = draw(st.sampled_from([-100, 0]))
    targets = draw(hnp.arrays(np.int64, positions, elements=st.integers(0, vocab - 1) | st.just(ignore_index)))
    # At least one target kept: with none kept the loss is nan, tested on its own.
    kept_target = draw(st.integers(0, vocab - 1).filter(lambda t: t != ignore_index))
    targets.reshape(-1)[draw(st.integers(0, targets.size - 1))] = kept_target
    logits = draw(values(positions + (vocab,), -20.0, 20.0))
    return Case((logits, targets), {"ignore_index": ignore_index})


@st.composite
def token_log_probs_cases(draw):
    vocab = draw(st.integers(2, 6))
    positions = draw(shapes(0, 2))
    targets = draw(hnp.arrays(np.int64, positions, elements=st.integers(0, vocab - 1)))
    return Case((draw(values(positions + (vocab,), -20.0, 20.0)), targets))


@st.composite
def attention_cases(draw, dropout=(0.0, 0.0, 0.1, 0.5)):
    batch, heads, t_query, head_size = (draw(st.integers(1, n)) for n in (2, 2, 5, 4))
    causal = draw(st.booleans())
    # With a KV cache the keys reach further back than the queries; causal masks align at the end.
    t_key = t_query + draw(st.integers(0, 2)) if causal else draw(st.integers(1, 5))
    q = draw(values((batch, heads, t_query, head_size)))
    k, v = (draw(values((batch, heads, t_key, head_size))) for _ in range(2))
    return Case((q, k, v), {"causal": causal, "dropout_p": draw(st.sampled_from(dropout)),
                            "seed": draw(st.integers(0, 2**16))})


@st.composite
def dropout_cases(draw):
    return Case((draw(values(draw(shapes(min_dims=1)))),),
                {"p": draw(st.sampled_from([0.1, 0.5, 0.9])), "seed": draw(st.integers(0, 2**16))})


# ---- dropout, which torch cannot replay --------------------------------------------------


def seeded(call, seed):
    """`call` with tinygrad_llm's generator seeded first, so the dropout mask is the same every time."""
    tl.manual_seed(seed)
    return call()


# The device compare_with_torch runs ours on: dropout masks differ between the CPU (drawn
# bits) and a GPU (hashed bits), so the torch side reads the mask off that same device.
_ours_device = ["cpu"]


def dropout_keep_mask(shape, p, seed, torch_dtype):
    """The keep-mask our dropout draws under `seed`, read off by dropping out a tensor of ones.

    torch's generator cannot replay ours, so the torch side applies this mask by hand.
    Attention draws its mask exactly like F.dropout on the attention weights (the book's
    `dropout(softmax(scores)) @ v`), so the same read-off serves both.
    """
    dtype = np.float32 if torch_dtype == torch.float32 else np.float64
    ones = Tensor(np.ones(shape, dtype), device=_ours_device[0])
    return torch.as_tensor(seeded(lambda: F.dropout(ones, p), seed).numpy() != 0)


# ---- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    ours: object            # (*Tensors, **options) -> Tensor or list of Tensors
    torch: object           # (*torch.Tensors, **options) -> the same
    cases: object           # hypothesis strategy of Case
    float64: Tolerance
    float32: Tolerance
    # Inputs for finite differences where `cases` has points with no derivative (ties in max)
    # or huge outputs (masked_fill with -1e9 or -inf swamp the differences); None: `cases`.
    gradcheck_cases: object = None

    def finite_difference_cases(self):
        return self.cases if self.gradcheck_cases is None else self.gradcheck_cases

    def tolerance(self, dtype):
        return self.float64 if np.dtype(dtype) == np.float64 else self.float32


def _sum(x, axis, keepdims):
    return x.sum(dim=axis, keepdim=keepdims)


def _mean(x, axis, keepdims):
    return x.mean(dim=axis, keepdim=keepdims)


def _amax(x, axis, keepdims):
    # amax, not max(dim): amax shares a gradient evenly between tied maxima, as ours does.
    return x.amax(dim=() if axis is None else axis, keepdim=keepdims)


def _torch_cross_entropy(logits, targets, ignore_index):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=ignore_index)


def _torch_token_log_probs(logits, targets):
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _torch_attention(q, k, v, causal, dropout_p, seed):
    keep = None
    if dropout_p:
        keep = dropout_keep_mask(q.shape[:-1] + k.shape[-2:-1], dropout_p, seed, q.dtype)
    return ref.causal_attention(q, k, v, causal=causal, keep=keep, dropout_p=dropout_p)


OPS = [
    # -- primitive ops of Tensor --
    Op("add", lambda a, b: a + b, lambda a, b: a + b, binary(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("sub", lambda a, b: a - b, lambda a, b: a - b, binary(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("mul", lambda a, b: a * b, lambda a, b: a * b, binary(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("div", lambda a, b: a / b, lambda a, b: a / b, binary(right=away_from_zero), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("neg", lambda a: -a, lambda a: -a, unary(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("scalar - tensor", lambda a, scalar: scalar - a, lambda a, scalar: scalar - a,
       scalar_operand_cases(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("scalar / tensor", lambda a, scalar: scalar / a, lambda a, scalar: scalar / a,
       scalar_operand_cases(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("tensor * scalar + scalar", lambda a, scalar: a * scalar + scalar, lambda a, scalar: a * scalar + scalar,
       scalar_operand_cases(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("pow", lambda a, exponent: a ** exponent, lambda a, exponent: a ** exponent, power_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("matmul", lambda a, b: a @ b, lambda a, b: a @ b, matmul_cases(), F64_REDUCTION, F32_REDUCTION),
    Op("sum", lambda a, axis, keepdims: a.sum(axis=axis, keepdims=keepdims), _sum, reduction(),
       F64_REDUCTION, F32_REDUCTION),
    Op("mean", lambda a, axis, keepdims: a.mean(axis=axis, keepdims=keepdims), _mean, reduction(),
       F64_REDUCTION, F32_REDUCTION),
    Op("max", lambda a, axis, keepdims: a.max(axis=axis, keepdims=keepdims), _amax, reduction(with_ties),
       F64_ELEMENTWISE, F32_ELEMENTWISE, gradcheck_cases=reduction(distinct)),
    Op("exp", lambda a: a.exp(), torch.exp, unary(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("log", lambda a: a.log(), torch.log, unary(lambda s: values(s, 0.1, 10.0)), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("tanh", lambda a: a.tanh(), torch.tanh, unary(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("sqrt", lambda a: a.sqrt(), torch.sqrt, unary(lambda s: values(s, 0.1, 10.0)), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("reshape", lambda a, shape: a.reshape(*shape), lambda a, shape: a.reshape(shape), reshape_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("transpose", lambda a, dim0, dim1: a.transpose(dim0, dim1), lambda a, dim0, dim1: a.transpose(dim0, dim1),
       transpose_cases(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("permute", lambda a, dims: a.permute(*dims), lambda a, dims: a.permute(dims), permute_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("getitem", lambda a, index: a[index], lambda a, index: a[_torch_index(index)], index_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("concatenate", lambda *pieces, axis: tl.concatenate(pieces, axis=axis),
       lambda *pieces, axis: torch.cat(pieces, dim=axis), concatenate_cases(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("split", lambda a, sections, axis: tl.split(a, sections, axis=axis),
       lambda a, sections, axis: torch.tensor_split(a, sections, dim=axis), split_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("where", lambda a, b, condition: tl.where(condition, a, b),
       lambda a, b, condition: torch.where(torch.as_tensor(condition), a, b), where_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("masked_fill", lambda a, mask, value: a.masked_fill(mask, value),
       lambda a, mask, value: a.masked_fill(torch.as_tensor(mask), value), masked_fill_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE, gradcheck_cases=masked_fill_cases(fill_values=(0.0, 2.5))),
    # -- fused ops with a hand-written backward --
    Op("linear", F.linear, torch.nn.functional.linear, linear_cases(), F64_REDUCTION, F32_REDUCTION),
    Op("lora_linear", _lora_linear, _torch_lora_linear, lora_linear_cases(), F64_REDUCTION, F32_REDUCTION),
    Op("lora_linear (frozen W, b)",
       lambda x, lora_A, lora_B, weight, bias, scale: F.lora_linear(
           x, _frozen(weight, x), _frozen(bias, x), lora_A, lora_B, scale),
       lambda x, lora_A, lora_B, weight, bias, scale: _torch_lora_linear(
           x, _torch_frozen(weight, x), lora_A, lora_B, *[_torch_frozen(b, x) for b in [bias] if b is not None],
           scale=scale),
       lora_linear_cases(frozen=True), F64_REDUCTION, F32_REDUCTION),
    Op("unpack_rows", lambda x, keep: F.unpack_rows(x, keep), _torch_unpack_rows, unpack_rows_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("embedding", F.embedding, lambda ids, weight: torch.nn.functional.embedding(ids, weight),
       embedding_cases(), F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("layer_norm", F.layer_norm, ref.layer_norm, layer_norm_cases(), F64_FUSED, F32_FUSED),
    Op("gelu", F.gelu, lambda x: torch.nn.functional.gelu(x, approximate="tanh"), unary(lambda s: values(s, -5.0, 5.0)),
       F64_ELEMENTWISE, Tolerance(1e-5, 1e-5, "the derivative adds two terms of size up to ~5 (x up to 5) that "
                                              "cancel to near 0 for negative x: a few ulps of the larger term")),
    Op("softmax", lambda x, axis: F.softmax(x, axis=axis), lambda x, axis: torch.softmax(x, dim=axis),
       softmax_cases(), F64_FUSED, F32_FUSED),
    Op("log_softmax", lambda x, axis: F.log_softmax(x, axis=axis), lambda x, axis: torch.log_softmax(x, dim=axis),
       softmax_cases(), F64_FUSED, F32_FUSED),
    Op("cross_entropy", F.cross_entropy, _torch_cross_entropy, cross_entropy_cases(), F64_FUSED, F32_FUSED),
    Op("token_log_probs", F.token_log_probs, _torch_token_log_probs, token_log_probs_cases(), F64_FUSED, F32_FUSED),
    # Values out to +-40 reach where a naive log(sigmoid(x)) underflows to log(0) in float32.
    Op("log_sigmoid", F.log_sigmoid, torch.nn.functional.logsigmoid, unary(lambda s: values(s, -40.0, 40.0)),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
    Op("scaled_dot_product_attention",
       lambda q, k, v, causal, dropout_p, seed: seeded(
           lambda: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p), seed),
       _torch_attention, attention_cases(), F64_FUSED, F32_FUSED),
    Op("dropout", lambda x, p, seed: seeded(lambda: F.dropout(x, p), seed),
       lambda x, p, seed: x * dropout_keep_mask(x.shape, p, seed, x.dtype) / (1 - p), dropout_cases(),
       F64_ELEMENTWISE, F32_ELEMENTWISE),
]

# ---- running one case --------------------------------------------------------------------


def _outputs(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def compare_with_torch(op, case, dtype, device=None):
    """Run `case` through `op` in both libraries in `dtype`; assert equal outputs and input gradients.

    Ours runs on `device` (default: the backend's, TINYGRAD_LLM_DEVICE): on "cuda" the same
    table checks CuPy, or in CI the stand-in for it, against torch.

    The gradient flowing into each output is random, not ones: with ones, softmax's
    backward (whose rows sum against the gradient to zero) would pass with any bug.
    """
    tolerance = op.tolerance(dtype)
    device = backend.default_device() if device is None else device
    _ours_device[0] = device
    arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in case.inputs]
    ours_inputs = [Tensor(a, requires_grad=a.dtype.kind == "f", device=device) for a in arrays]
    torch_inputs = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    ours = _outputs(op.ours(*ours_inputs, **{k: _on_device(v, device) for k, v in case.options.items()}))
    theirs = _outputs(op.torch(*torch_inputs, **case.options))
    assert len(ours) == len(theirs), f"{op.name}: {len(ours)} outputs, torch gives {len(theirs)}"

    rng = np.random.default_rng(0)
    upstream = [rng.standard_normal(out.shape).astype(dtype) for out in ours]
    for i, (mine, expected) in enumerate(zip(ours, theirs)):
        assert mine.dtype == dtype, f"{op.name} output {i} is {mine.dtype}, expected {np.dtype(dtype)}"
        _assert_close(mine.numpy(), expected.detach().numpy(), tolerance, f"{op.name} output {i}")

    if len(ours) == 1:
        ours[0].backward(upstream[0])
    else:
        sum((out * g).sum() for out, g in zip(ours, upstream)).backward()
    torch.autograd.backward(theirs, [torch.from_numpy(g) for g in upstream])
    for i, (mine, expected) in enumerate(zip(ours_inputs, torch_inputs)):
        if not mine.requires_grad:
            continue
        expected_grad = np.zeros(mine.shape, dtype) if expected.grad is None else expected.grad.numpy()
        assert mine.grad is not None, f"{op.name}: input {i} got no gradient"
        assert mine.grad.shape == mine.shape and mine.grad.dtype == dtype, (
            f"{op.name}: gradient of input {i} is {mine.grad.dtype}{mine.grad.shape}, "
            f"expected {np.dtype(dtype)}{mine.shape}")
        _assert_close(backend.to_host(mine.grad), expected_grad, tolerance, f"{op.name} gradient of input {i}")


def _on_device(option, device):
    """Arrays in the options (indices, masks) moved beside the inputs, so the op runs on one device."""
    if isinstance(option, np.ndarray):
        return backend.to_device(option, device)
    if isinstance(option, tuple):
        return tuple(_on_device(part, device) for part in option)
    return option


def _assert_close(actual, expected, tolerance, what):
    np.testing.assert_allclose(actual, expected, rtol=tolerance.rtol, atol=tolerance.atol,
                               err_msg=f"{what} ({tolerance.why})")


def gradcheck_case(op, case):
    """tl.gradcheck of `op` on `case` in float64; several outputs are checked as one vector."""

    def call(*inputs):
        outputs = _outputs(op.ours(*inputs, **case.options))
        return outputs[0] if len(outputs) == 1 else tl.concatenate([out.reshape(-1) for out in outputs])

    return tl.gradcheck(call, *case.inputs)
