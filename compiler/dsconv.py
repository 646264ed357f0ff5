"""DSConv weights (Nascimento et al., ICCV 2019): integer weights with a scale per block.

The input-channel axis of each (output channel, kernel tap) is split into blocks of ``BLK``
channels. Inside a block the integer weights are (METHODS.md, "DSConv")::

    q = clamp(round(w * (-2**(b-1)) / w_am), -2**(b-1), 2**(b-1) - 1)

with ``w_am`` the signed element of largest magnitude, and the block's scale is the least-squares
``alpha = <w, q> / <q, q>``, so a block is ``alpha * q``. The paper keeps ``alpha`` signed (a
positive ``w_am`` gives ``alpha < 0``); the hardware's rescale multiplier is unsigned, so a block
whose ``w_am`` is positive is mirrored (``q -> round(w * (2**(b-1) - 1) / w_am)``, ``alpha > 0``):
the extreme value then lands on ``2**(b-1) - 1`` instead of ``-2**(b-1)``, one level less than the
paper for that block, and every ``alpha`` is >= 0.

On Quarry a block is ``BLK = k * rows`` input channels (one or more of the array's channel
blocks, so one MATMUL tile never straddles two blocks). Each tile's sums are rescaled in the
accumulator path (``block_scale`` configs, ``hw.top``) before they are accumulated::

    acc += round_shift(sum * m, shift)     m = round(alpha / s_ref * 2**(shift + G))

``s_ref`` is the largest ``alpha`` of the output channel, so ``m <= 2**(shift + G)``; ``G`` extra
fraction bits are kept in the accumulator, as many (up to :data:`MAX_FRACTION_BITS`) as the
layer's worst-case sum leaves room for in ``acc_width``. The accumulator then holds the layer's
output in units of ``s_ref / 2**G``: that is the channel's weight scale for bias and
requantization, which stay as for any integer layer.

Block-floating-point activations (``QuantOptions.bfp`` on a ``bfp_exp_bits`` config): the
paper's activations share an exponent per block of channels at each pixel. On Quarry the block is
one spad row (``rows`` channels of one pixel, at most the weight block), and the exponent
travels with the row: the POST that writes a row picks the smallest exponent ``e <= bfp_emax``
whose mantissas fit ``lo..hi`` (:func:`bfp_round`, the golden model's rule), and the block
rescale of every MATMUL vector read from that row shifts by ``shift - e``. A tensor's ``scale``
is the mantissa unit at exponent 0, so its values are ``mantissa << e`` in that unit, up to
``hi << bfp_emax``; blocks of small activations keep ``bfp_emax`` more bits of resolution than a
per-tensor uniform code. The model input stays uniform (the host quantizes it).
"""

from __future__ import annotations

import numpy as np

from .kernels import dense_weights

__all__ = ["block_quantize", "fixed_point_scales", "effective_weights", "bfp_round", "MAX_FRACTION_BITS",
           "DSConvError"]

#: Most fraction bits kept in the accumulator below the channel's largest block scale.
MAX_FRACTION_BITS = 8


class DSConvError(ValueError):
    """DSConv options do not fit the accelerator (block size, block_scale hardware)."""


def block_quantize(w: np.ndarray, bits: int, blk: int, rows: int, groups: int = 1):
    """DSConv-quantize conv weights ``w`` (Cout, Cin/groups, kh, kw).

    Blocks are ``blk`` consecutive input channels of the layer's (dense) input, per output
    channel and tap; ``blk`` must be a multiple of ``rows``. Returns ``(q, alpha)``: ``q`` the
    integer weights in ``w``'s shape, ``alpha`` (Cout, ceil(Cin / rows), kh, kw) the scale of the
    block each of the array's channel blocks belongs to (>= 0; 0 for an all-zero block).
    """
    if blk < rows or blk % rows:
        raise DSConvError(f"DSConv block size {blk} must be a multiple of the array's rows ({rows})")
    w = np.asarray(w, np.float64)
    cout, cin_g, kh, kw = w.shape
    dense = dense_weights(w, groups)
    cin = dense.shape[1]
    n_blk = -(-cin // blk)
    pad = np.zeros((cout, n_blk * blk, kh, kw))
    pad[:, :cin] = dense
    # (cout, n_blk, blk, kh, kw) -> blocks along axis 2
    b = pad.reshape(cout, n_blk, blk, kh, kw)
    idx = np.abs(b).argmax(axis=2)
    w_am = np.take_along_axis(b, idx[:, :, None], axis=2)[:, :, 0]  # (cout, n_blk, kh, kw)
    top = 1 << (bits - 1)
    safe = np.where(w_am == 0, 1.0, w_am)
    neg = (w_am < 0)[:, :, None]
    # Negative extreme: the paper's mapping (extreme -> -2**(b-1)); positive: mirrored.
    q = np.where(neg, np.round(b * top / np.abs(safe)[:, :, None]),
                 np.round(b * (top - 1) / np.abs(safe)[:, :, None]))
    q = np.clip(q, -top, top - 1)
    qq = (q * q).sum(axis=2)
    alpha = np.where(qq > 0, (b * q).sum(axis=2) / np.where(qq > 0, qq, 1), 0.0)
    alpha = np.maximum(alpha, 0.0)  # q has w's signs, so <w, q> >= 0 (guard rounding)
    q_dense = q.reshape(cout, n_blk * blk, kh, kw)[:, :cin].astype(np.int64)
    per = cout // groups
    q_out = np.zeros((cout, cin_g, kh, kw), np.int64)
    for g in range(groups):
        q_out[g * per:(g + 1) * per] = q_dense[g * per:(g + 1) * per, g * cin_g:(g + 1) * cin_g]
    n_cb = -(-cin // rows)
    alpha_cb = np.repeat(alpha, blk // rows, axis=1)[:, :n_cb]
    return q_out, alpha_cb


def fixed_point_scales(q: np.ndarray, alpha: np.ndarray, rows: int, groups: int, mult_bits: int,
                       max_shift: int, a_max: int, acc_width: int):
    """Block scales as the hardware applies them.

    Returns ``(mult, shift, w_scale, G)``: per channel block ``mult``/``shift`` (Cout, n_cb, kh,
    kw), the per-output-channel scale of one accumulator unit (``s_ref / 2**G``), and ``G``.
    ``G`` is the most fraction bits (<= :data:`MAX_FRACTION_BITS`) for which the worst-case
    accumulator sum (every activation at ``a_max`` in magnitude, plus one rounding unit per
    tile) stays inside ``acc_width`` bits.
    """
    cout = alpha.shape[0]
    s_ref = alpha.reshape(cout, -1).max(axis=1)
    s_ref = np.where(s_ref > 0, s_ref, 1.0)
    rel = alpha / s_ref[:, None, None, None]  # in [0, 1]
    dense = dense_weights(np.asarray(q, np.int64), groups)
    cin = dense.shape[1]
    n_cb = alpha.shape[1]
    pad = np.zeros((cout, n_cb * rows) + dense.shape[2:], np.int64)
    pad[:, :cin] = dense
    absq = np.abs(pad).reshape(cout, n_cb, rows, *dense.shape[2:]).sum(axis=2)  # (cout, n_cb, kh, kw)
    limit = (1 << (acc_width - 1)) - 1
    shift = min(mult_bits - 1, max_shift)
    G = 0
    for g in range(min(MAX_FRACTION_BITS, shift), -1, -1):
        bound = (absq * a_max * rel * (1 << g) + 1).sum(axis=(1, 2, 3)).max()
        if bound <= limit:
            G = g
            break
    sh = shift - G
    mult = np.round(rel * (1 << shift)).astype(np.int64)  # <= 2**shift < 2**mult_bits
    mult = np.where(alpha > 0, mult, 0)
    return mult, np.full(mult.shape, sh, np.int64), s_ref / (1 << G), G


def effective_weights(q: np.ndarray, mult: np.ndarray, shift: np.ndarray, rows: int, groups: int) -> np.ndarray:
    """Integer weights bounding what the accumulator sums (for the overflow check): each
    ``|q| * mult / 2**shift`` rounded up, with ``q``'s sign, in ``q``'s (grouped) shape."""
    q = np.asarray(q, np.int64)
    cout, cin_g, kh, kw = q.shape
    out = np.zeros_like(q)
    for g in range(groups):
        per = cout // groups
        for i in range(cin_g):
            cb = (g * cin_g + i) // rows
            sl = slice(g * per, (g + 1) * per)
            gain = mult[sl, cb] / np.power(2.0, shift[sl, cb])  # (per, kh, kw)
            out[sl, i] = np.sign(q[sl, i]) * np.ceil(np.abs(q[sl, i]) * gain)
    return out


def bfp_round(y: np.ndarray, lo: int, hi: int, emax: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-floating-point codes of integer values ``y`` (N, C, H, W), as a BFP POST writes them.

    Per pixel and block of ``rows`` channels (a spad row)::

        t = y if y >= 0 else (-y - 1 if lo < 0 else 0)     # what must fit; ReLU clamps negatives
        e = min(emax, max(0, bitlen(max t) - bitlen(hi)))
        mantissa = clamp(round_shift(y, e), lo, hi)

    Returns ``(mantissas (N, C, H, W), exponents (N, ceil(C / rows), H, W))``.
    """
    y = np.asarray(y, np.int64)
    n, c, h, w = y.shape
    nb = -(-c // rows)
    t = np.where(y >= 0, y, (-y - 1) if lo < 0 else 0)
    tp = np.zeros((n, nb * rows, h, w), np.int64)
    tp[:, :c] = t
    tmax = tp.reshape(n, nb, rows, h, w).max(axis=2)
    bitlen = sum(((tmax >> k) > 0).astype(np.int64) for k in range(63))  # exact, any int64
    e = np.clip(bitlen - int(hi).bit_length(), 0, emax)
    ec = np.repeat(e, rows, axis=1)[:, :c]
    half = np.where(ec > 0, np.left_shift(np.int64(1), np.maximum(ec - 1, 0)), 0)
    mant = np.right_shift(y + half - ((y < 0) & (ec > 0)), ec)
    return np.clip(mant, lo, hi), e
