"""Brute-force numpy references used by the tests (written for clarity, not speed)."""
from fractions import Fraction
import math

import numpy as np


def appendix_a_bins(a, n):
    """Bin i of n on an a-cell axis: [floor(i*a/n), ceil((i+1)*a/n)), with exact rationals."""
    return [(math.floor(Fraction(i * a, n)), math.ceil(Fraction((i + 1) * a, n))) for i in range(n)]


def caffe_pool_windows(a, kernel, stride):
    """Caffe's ceil-mode max pool on an a-cell axis (no padding): its windows, clipped to the axis."""
    count = math.ceil((a - kernel) / stride) + 1
    return [(i * stride, min(i * stride + kernel, a)) for i in range(count)]


def released_bins(a, n):
    """The released model's bins: its 2x2 level is a Caffe pool with kernel = stride = ceil(a/2)
    ([0, 7), [7, 13) at 13); a = 1 repeats the one cell; every other level is Appendix A."""
    if n != 2:
        return appendix_a_bins(a, n)
    return caffe_pool_windows(a, math.ceil(a / 2), math.ceil(a / 2)) if a > 1 else [(0, 1), (0, 1)]


def pool_ref(x, levels, bins=appendix_a_bins):
    """(B, H, W, C) -> (B, C*sum(n*n)): loops over every bin; levels in order, (y, x, C) inside."""
    b, h, w, c = x.shape
    out = []
    for n in levels:
        p = np.empty((b, n, n, c), x.dtype)
        for i, (y0, y1) in enumerate(bins(h, n)):
            for j, (x0, x1) in enumerate(bins(w, n)):
                p[:, i, j] = x[:, y0:y1, x0:x1].max(axis=(1, 2))
        out.append(p.reshape(b, -1))
    return np.concatenate(out, axis=1)


def project_ref(box, stride, offset, slack, h, w):
    """Enumerate cells whose centre offset+stride*j lies in (x1-slack, x2+slack); released-code rule."""
    out = []
    for lo, hi, size in ((box[0], box[2], w), (box[1], box[3], h)):
        js = [j for j in range(-1000, 1000) if lo - slack < offset + stride * j < hi + slack]
        if js:
            s, e = min(js), max(js)
        else:  # no centre inside: start = first centre right of lo - slack, end = last left of hi + slack
            s = min(j for j in range(-1000, 1000) if offset + stride * j > lo - slack)
            e = max(j for j in range(-1000, 1000) if offset + stride * j < hi + slack)
            s = e = (s + e) // 2
        out.append((min(max(s, 0), size - 1), min(max(e, 0), size - 1)))
    (xs, xe), (ys, ye) = out
    return xs, ys, xe, ye


def roi_pool_ref(fmap, cells, levels, bins=appendix_a_bins):
    """(H, W, C), (R, 4) inclusive cells -> (R, C*sum(n*n)) by cropping and pooling each window."""
    return np.concatenate([pool_ref(fmap[None, y0:y1 + 1, x0:x1 + 1], levels, bins)
                           for x0, y0, x1, y1 in np.asarray(cells)], axis=0)


def iou_voc(a, b):
    """IoU of two (x1, y1, x2, y2) boxes with VOC's +1-pixel convention, by hand (scalar)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union


def window_ref(x, rows, cols, g):
    """Brute force: every window's max, and its cotangent sent to the window's first max
    cell in row-major order (np.argmax of the row-major flattened window)."""
    b, h, w, c = x.shape
    y = np.zeros((b, len(rows), len(cols), c), np.float32)
    dx = np.zeros_like(x)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            win = x[:, r0:r1, c0:c1, :]
            y[:, i, j] = win.max(axis=(1, 2))
            flat = win.transpose(0, 3, 1, 2).reshape(b, c, -1)
            k = flat.argmax(-1)  # first maximum, row-major
            dr, dc = np.divmod(k, c1 - c0)
            for bi in range(b):
                for ci in range(c):
                    dx[bi, r0 + dr[bi, ci], c0 + dc[bi, ci], ci] += g[bi, i, j, ci]
    return y, dx


def conv_ref(x, w, stride, padding):
    """Brute-force float64 convolution: (B,H,W,C) x (KH,KW,C,F), stride, ((top, bottom), (left,
    right)) zero padding -> (B,OH,OW,F)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    kh, kw = w.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, i, j] = np.einsum("bhwc,hwcf->bf", patch, np.asarray(w, np.float64))
    return out


def conv_grads_ref(x, w, stride, padding, dy):
    """Brute-force (d x, d w) of :func:`conv_ref` for the output cotangent ``dy``: every output
    cell sends dy times the kernel back to its input patch and dy times the patch to the
    kernel."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    w, dy = np.asarray(w, np.float64), np.asarray(dy, np.float64)
    kh, kw = w.shape[:2]
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
            dxp[:, rows, cols] += np.einsum("bf,hwcf->bhwc", dy[:, i, j], w)
            dw += np.einsum("bhwc,bf->hwcf", xp[:, rows, cols], dy[:, i, j])
    (t, _), (l, _) = padding
    return dxp[:, t:t + x.shape[1], l:l + x.shape[2]], dw
