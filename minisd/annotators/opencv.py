"""The few OpenCV routines the annotators of controlnet_aux call, written out so ours give the same pixels:
`cv2.resize` (INTER_AREA, INTER_LANCZOS4, INTER_NEAREST) and the drawing primitives `ellipse2Poly`,
`fillConvexPoly` and a filled `circle` (8-connected, no sub-pixel shift).

Each follows OpenCV 4.x's source (modules/imgproc/src/resize.cpp, drawing.cpp) down to its rounding: uint8
resizes compute in the same fixed-point or float32 arithmetic in the same order, and the drawing walks the same
integer scanlines. Images are numpy arrays (H, W) or (H, W, C), as cv2 takes them.
"""
import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# resize
# ----------------------------------------------------------------------------------------------------------------

RESIZE_COEF_BITS = 11                  # uint8 kernels use weights in 1/2048ths (INTER_RESIZE_COEF_BITS)


def resize(image: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """cv2.resize(image, (width, height), interpolation=...) for interpolation 'area', 'lanczos4' or 'nearest',
    uint8 or float32."""
    h, w = image.shape[:2]
    if image.dtype not in (np.uint8, np.float32):
        raise ValueError(f"resize takes uint8 or float32 images, got {image.dtype}")
    if (w, h) == (width, height):
        return image.copy()                                  # cv2 copies an equal-size resize
    if interpolation == "nearest":
        return _resize_nearest(image, width, height)
    if interpolation == "lanczos4":
        return _resize_separable(image, width, height, _lanczos4_taps)
    if interpolation == "area":
        scale_x, scale_y = w / width, h / height
        if scale_x >= 1 and scale_y >= 1:                    # shrinking both ways: averages over the cells
            if scale_x == int(scale_x) and scale_y == int(scale_y):
                return _resize_area_integer(image, int(scale_x), int(scale_y))
            return _resize_area(image, width, height)
        return _resize_separable(image, width, height, _area_linear_taps)   # growing one way: bilinear-like
    raise ValueError(f"unknown interpolation {interpolation!r}; expected 'area', 'lanczos4' or 'nearest'")


def _resize_nearest(image, width, height):
    """cv2's INTER_NEAREST: source index floor(dst * src/dst) (not the pixel centre), clamped."""
    h, w = image.shape[:2]
    xs = np.minimum(np.floor(np.arange(width) * (w / width)).astype(int), w - 1)
    ys = np.minimum(np.floor(np.arange(height) * (h / height)).astype(int), h - 1)
    return image[ys][:, xs]


def _lanczos4_weights(f: float) -> np.ndarray:
    """The 8 Lanczos (a=4) weights for fractional offset f, as float32 like OpenCV's interpolateLanczos4: the
    sines of the 8 taps from one sin/cos pair, divided by y^2, then normalized with a float32 sum."""
    s45 = 0.70710678118654752440084436210485
    cs = [(1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45)]
    y0 = -(f + 3) * np.pi * 0.25
    s0, c0 = np.sin(y0), np.cos(y0)
    coeffs = np.zeros(8, np.float32)
    total = np.float32(0)
    for i in range(8):
        d = np.float32(np.float32(f) + 3 - i)
        if abs(d) >= 1e-6:
            y = -float(d) * np.pi * 0.25
            coeffs[i] = np.float32((cs[i][0] * s0 + cs[i][1] * c0) / (y * y))
        else:
            coeffs[i] = np.float32(1e30)                      # the tap exactly on the sample takes it all
        total = np.float32(total + coeffs[i])
    return coeffs * np.float32(np.float32(1) / total)


def _lanczos4_taps(dst: int, src: int):
    """(first source index (may be negative), float32 weights (dst, 8)) per output index: sample point
    (d + 0.5) * src/dst - 0.5 (pixel centres), taps at floor(point) - 3 .. + 4."""
    scale = src / dst
    first, weights = np.empty(dst, int), np.empty((dst, 8), np.float32)
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = int(np.floor(f))
        first[d], weights[d] = s - 3, _lanczos4_weights(np.float32(f - s))
    return first, weights


def _area_linear_taps(dst: int, src: int):
    """INTER_AREA along an axis that grows: two-tap linear weights whose fraction is the part of the output
    cell past the source pixel's edge (OpenCV's `area_mode`), clamped at the borders."""
    scale, inv_scale = src / dst, dst / src
    first, weights = np.empty(dst, int), np.empty((dst, 2), np.float32)
    for d in range(dst):
        s = int(np.floor(d * scale))
        f = np.float32((d + 1) - (s + 1) * inv_scale)
        f = np.float32(0) if f <= 0 else np.float32(f - np.floor(f))
        if s < 0:
            s, f = 0, np.float32(0)
        if s >= src - 1:
            s, f = src - 1, np.float32(0)
        first[d], weights[d] = s, (np.float32(1) - f, f)
    return first, weights


def _resize_separable(image, width, height, taps):
    """OpenCV's generic resize: a horizontal pass over each source row, then a vertical pass, taps outside the
    image clamped to the edge. uint8 uses 11-bit integer weights and rounds once at the end (>> 22); float32
    sums in float32 tap by tap."""
    h, w = image.shape[:2]
    x_first, x_weights = taps(width, w)
    y_first, y_weights = taps(height, h)
    k = x_weights.shape[1]
    x_index = np.clip(x_first[:, None] + np.arange(k), 0, w - 1)        # (width, k)
    y_index = np.clip(y_first[:, None] + np.arange(k), 0, h - 1)        # (height, k)
    fixed = image.dtype == np.uint8
    if fixed:
        x_weights = np.rint(x_weights.astype(np.float64) * (1 << RESIZE_COEF_BITS)).astype(np.int64)
        y_weights = np.rint(y_weights.astype(np.float64) * (1 << RESIZE_COEF_BITS)).astype(np.int64)
        src = image.astype(np.int64)
    else:
        src = image
    extra = (None,) * (image.ndim - 2)                                  # broadcast weights over channels
    rows = src[:, x_index[:, 0]] * x_weights[(slice(None), 0) + extra]
    for t in range(1, k):                                               # (h, width[, C]), one tap at a time
        rows = rows + src[:, x_index[:, t]] * x_weights[(slice(None), t) + extra]
    if fixed and k == 2:
        return _vertical_linear_fixed(rows, y_index, y_weights)
    out = rows[y_index[:, 0]] * y_weights[(slice(None), 0, None) + extra]
    for t in range(1, k):
        out = out + rows[y_index[:, t]] * y_weights[(slice(None), t, None) + extra]
    if fixed:
        shift = 2 * RESIZE_COEF_BITS
        return np.clip((out + (1 << (shift - 1))) >> shift, 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def _vertical_linear_fixed(rows, y_index, y_weights):
    """The vertical pass of OpenCV's 2-tap uint8 kernel (VResizeLinear's SIMD form): each row's sum is cut to
    16 bits before the multiply, ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16), then rounded >> 2."""
    extra = (None,) * (rows.ndim - 2)
    b0, b1 = y_weights[(slice(None), 0, None) + extra], y_weights[(slice(None), 1, None) + extra]
    out = ((b0 * (rows[y_index[:, 0]] >> 4)) >> 16) + ((b1 * (rows[y_index[:, 1]] >> 4)) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def _area_table(dst: int, src: int):
    """OpenCV's computeResizeAreaTab: for each output cell [d*scale, (d+1)*scale) the source pixels it covers
    and the fraction of the cell each covers (partial pixels at both ends), as float32."""
    scale = src / dst
    table = []                                                          # (dst index, src index, weight)
    for d in range(dst):
        start = d * scale
        end = start + scale
        cell = min(scale, src - start)
        first, last = int(np.ceil(start)), int(np.floor(end))
        last = min(last, src - 1)
        first = min(first, last)
        if first - start > 1e-3:
            table.append((d, first - 1, np.float32((first - start) / cell)))
        for s in range(first, last):
            table.append((d, s, np.float32(1.0 / cell)))
        if end - last > 1e-3:
            table.append((d, last, np.float32(min(min(end - last, 1.0), cell) / cell)))
    return table


def _resize_area(image, width, height):
    """INTER_AREA by a non-integer factor: each output pixel is the cell-weighted mean of the source pixels
    under it, accumulated in float32 in OpenCV's order (a row's horizontal sums, then rows weighted into the
    output row), rounded half to even."""
    h, w = image.shape[:2]
    x_table, y_table = _area_table(width, w), _area_table(height, h)
    x_dst = np.array([t[0] for t in x_table])
    x_src = np.array([t[1] for t in x_table])
    x_w = np.array([t[2] for t in x_table], np.float32)
    # the horizontal pass of every source row at once, each output column's entries added in table order
    src = image.astype(np.float32)
    rows = np.zeros((h, width) + image.shape[2:], np.float32)
    for d, s, a in zip(x_dst, x_src, x_w):
        rows[:, d] = rows[:, d] + src[:, s] * a
    out = np.zeros((height, width) + image.shape[2:], np.float32)
    started = np.zeros(height, bool)
    for d, s, b in y_table:
        if started[d]:
            out[d] = out[d] + b * rows[s]
        else:                                                           # the first row of a cell starts its sum
            out[d] = b * rows[s]
            started[d] = True
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def _resize_area_integer(image, fx: int, fy: int):
    """INTER_AREA by whole factors (OpenCV's resizeAreaFast): the mean of each fx by fy block. uint8 2x2 blocks
    round half up ((sum + 2) >> 2, its SIMD path); other uint8 factors round sum * (1/area) half to even."""
    h, w = image.shape[:2]
    height, width = h // fy, w // fx
    blocks = image[:height * fy, :width * fx].reshape((height, fy, width, fx) + image.shape[2:])
    if image.dtype == np.uint8:
        total = blocks.astype(np.int64).sum(axis=(1, 3))
        if (fx, fy) == (2, 2):
            return ((total + 2) >> 2).astype(np.uint8)
        return np.clip(np.rint(total * np.float32(1.0 / (fx * fy))), 0, 255).astype(np.uint8)
    return (blocks.sum(axis=(1, 3), dtype=np.float32) * np.float32(1.0 / (fx * fy))).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# drawing (8-connected, shift 0: the only mode draw_bodypose uses)
# ----------------------------------------------------------------------------------------------------------------

XY_SHIFT = 16                          # fillConvexPoly walks edges in 16.16 fixed point
XY_ONE = 1 << XY_SHIFT

# OpenCV's sine table: sin(i degrees) for i = 0..450 rounded to 7 decimals, as float32 (drawing.cpp SinTable)
SIN_TABLE = np.round(np.sin(np.deg2rad(np.arange(451))), 7).astype(np.float32)


def _c_div(a: int, b: int) -> int:
    """C's integer division (truncates toward zero; Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def ellipse2poly(center, axes, angle: int, arc_start: int, arc_end: int, delta: int):
    """cv2.ellipse2Poly with integer arguments: points every `delta` degrees along the (rotated) ellipse, from
    the table sines, rounded half to even; consecutive duplicates dropped."""
    while angle < 0:
        angle += 360
    while angle > 360:
        angle -= 360
    if arc_start > arc_end:
        arc_start, arc_end = arc_end, arc_start
    while arc_start < 0:
        arc_start, arc_end = arc_start + 360, arc_end + 360
    while arc_end > 360:
        arc_start, arc_end = arc_start - 360, arc_end - 360
    if arc_end - arc_start > 360:
        arc_start, arc_end = 0, 360
    alpha, beta = float(SIN_TABLE[450 - angle]), float(SIN_TABLE[angle])     # cos, sin of the rotation
    points = []
    for i in range(arc_start, arc_end + delta, delta):
        a = min(i, arc_end)
        a += 360 if a < 0 else 0
        x = axes[0] * float(SIN_TABLE[450 - a])
        y = axes[1] * float(SIN_TABLE[a])
        point = (int(np.rint(center[0] + x * alpha - y * beta)), int(np.rint(center[1] + x * beta + y * alpha)))
        if not points or point != points[-1]:
            points.append(point)
    if len(points) == 1:                                                # a zero-size ellipse: a degenerate edge
        points = [tuple(center), tuple(center)]
    return points


def _clip_line(width, height, p1, p2):
    """OpenCV's clipLine (Cohen-Sutherland with C integer division): the part of the segment inside the image,
    or None."""
    right, bottom = width - 1, height - 1
    (x1, y1), (x2, y2) = p1, p2

    def code(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += _c_div((a - y1) * (x2 - x1), y2 - y1)
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += _c_div((a - y2) * (x2 - x1), y2 - y1)
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += _c_div((a - x1) * (y2 - y1), x2 - x1)
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += _c_div((a - x2) * (y2 - y1), x2 - x1)
                x2 = a
                c2 = 0
    return ((x1, y1), (x2, y2)) if (c1 | c2) == 0 else None


def _line(canvas, p1, p2, color):
    """An 8-connected Bresenham line (OpenCV's LineIterator, left to right), clipped to the canvas first."""
    h, w = canvas.shape[:2]
    if not (0 <= p1[0] < w and 0 <= p2[0] < w and 0 <= p1[1] < h and 0 <= p2[1] < h):
        clipped = _clip_line(w, h, p1, p2)
        if clipped is None:
            return
        p1, p2 = clipped
    if p2[0] < p1[0]:
        p1, p2 = p2, p1
    (x, y), dx, dy = p1, p2[0] - p1[0], p2[1] - p1[1]
    step_y = 1 if dy >= 0 else -1
    dy = abs(dy)
    vertical = dy > dx
    major, minor = (dy, dx) if vertical else (dx, dy)
    err = major - 2 * minor
    for _ in range(major + 1):
        canvas[y, x] = color
        minor_step = err < 0
        err += -2 * minor + (2 * major if minor_step else 0)
        if vertical:
            y += step_y
            x += minor_step
        else:
            x += 1
            y += step_y * minor_step


def fill_convex_poly(canvas, points, color):
    """cv2.fillConvexPoly(canvas, points, color) (lineType 8, shift 0): the outline drawn as lines, then the
    scanlines between a left and a right edge walker, their x in 16.16 fixed point."""
    h, w = canvas.shape[:2]
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    previous = points[-1]
    for p in points:
        _line(canvas, previous, p, color)
        previous = p
    top = min(range(n), key=lambda i: (ys[i], i))                     # the first vertex with the smallest y
    y_min, y_max, x_min, x_max = ys[top], max(ys), min(xs), max(xs)
    if n < 3 or x_max < 0 or y_max < 0 or x_min >= w or y_min >= h:
        return
    y_max = min(y_max, h - 1)
    # each walker: [index of its current vertex, direction, x (16.16), dx per row, y where its edge ends]
    walkers = [[top, 1, -XY_ONE, 0, y_min], [top, n - 1, -XY_ONE, 0, y_min]]
    edges_left = n                                                     # both walkers share this budget
    y = y_min
    while True:
        for walker in walkers:
            if y >= walker[4]:
                start, di = walker[0], walker[1]
                nxt = (start + di) % n
                while edges_left > 0:
                    edges_left -= 1
                    ty = ys[nxt]
                    if ty > y:
                        xs0, xe = xs[start] << XY_SHIFT, xs[nxt] << XY_SHIFT
                        walker[4] = ty
                        walker[3] = _c_div((xe - xs0) * 2 + (ty - y), 2 * (ty - y))
                        walker[2] = xs0
                        walker[0] = nxt
                        break
                    start = nxt
                    nxt = (nxt + di) % n
                else:
                    edges_left -= 1                                    # the C loop's final `edges--` test
        if edges_left < 0:
            break
        if y >= 0:
            left, right = walkers[::-1] if walkers[0][2] > walkers[1][2] else walkers
            x1 = (left[2] + (XY_ONE >> 1)) >> XY_SHIFT
            x2 = (right[2] + (XY_ONE >> 1)) >> XY_SHIFT
            if x2 >= 0 and x1 < w:
                canvas[y, max(x1, 0):min(x2, w - 1) + 1] = color
        walkers[0][2] += walkers[0][3]
        walkers[1][2] += walkers[1][3]
        y += 1
        if y > y_max:
            break


def fill_circle(canvas, center, radius: int, color):
    """cv2.circle(canvas, center, radius, color, thickness=-1): the midpoint circle, each octant's span filled
    as a horizontal line, clipped to the canvas."""
    h, w = canvas.shape[:2]
    cx, cy = center
    err, dx, dy, plus, minus = 0, radius, 0, 1, (radius << 1) - 1
    while dx >= dy:
        for row, half in ((cy - dy, dx), (cy + dy, dx), (cy - dx, dy), (cy + dx, dy)):
            x1, x2 = cx - half, cx + half
            if 0 <= row < h and x1 < w and x2 >= 0:
                canvas[row, max(x1, 0):min(x2, w - 1) + 1] = color
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2
