# Sums over one window of interleaved ADC samples, in integers only.
#
# A window holds n frames of m inputs each (buf[k*m + j] = raw code of input j
# in frame k). Raw codes go through the per-chip linearisation table `lut`
# (code -> linear units) and every sum is kept as two small integers,
# acc[2*s] (low 28 bits) and acc[2*s+1] (the rest), so nothing grows into a
# heap-allocated long integer on a board whose small ints end at 2**30.
# The loops allocate nothing: the table, the buffer and the accumulator are
# preallocated arrays and the sums live in local small ints.
try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_FOLD = const(0x10000000)
_MASK = const(0x0FFFFFFF)

# accumulator slots for one current channel against the voltage input
S_I = const(0)       # sum i
S_II = const(1)      # sum i*i
S_VI = const(2)      # sum v[k+q] * i[k]
S_VNI = const(3)     # sum v[k+q+1] * i[k]
S_V = const(4)       # sum v[k+q]
S_VN = const(5)      # sum v[k+q+1]
N_SLOTS = const(6)


def clear(acc):
    for j in range(len(acc)):
        acc[j] = 0


def value(acc, slot):
    return acc[2 * slot + 1] * _FOLD + acc[2 * slot]


def sum_sq(buf, lut, m, j, k0, k1, acc):
    """acc[0..3] <- sum x, sum x*x of input j over frames k0..k1-1."""
    s_lo = acc[0]
    s_hi = acc[1]
    q_lo = acc[2]
    q_hi = acc[3]
    i = k0 * m + j
    end = k1 * m + j
    while i < end:
        x = lut[buf[i]]
        s_lo += x
        q_lo += x * x
        if q_lo >= _FOLD:
            q_hi += q_lo >> 28
            q_lo &= _MASK
        if s_lo >= _FOLD:
            s_hi += s_lo >> 28
            s_lo &= _MASK
        i += m
    acc[0] = s_lo
    acc[1] = s_hi
    acc[2] = q_lo
    acc[3] = q_hi


def cross(buf, lut, m, jv, ji, q, k0, k1, acc):
    """Sums of current input ji against voltage input jv shifted by q and q+1
    frames, over frames k0..k1-1 (the caller keeps k0+q >= 0 and
    k1+q+1 <= frames)."""
    a0 = acc[0]
    a1 = acc[1]
    b0 = acc[2]
    b1 = acc[3]
    c0 = acc[4]
    c1 = acc[5]
    e0 = acc[6]
    e1 = acc[7]
    f0 = acc[8]
    f1 = acc[9]
    g0 = acc[10]
    g1 = acc[11]
    k = k0 * m
    end = k1 * m
    dv = q * m + jv
    while k < end:
        x = lut[buf[k + ji]]
        v = lut[buf[k + dv]]
        vn = lut[buf[k + dv + m]]
        a0 += x
        b0 += x * x
        c0 += v * x
        e0 += vn * x
        f0 += v
        g0 += vn
        if f0 >= _FOLD:
            f1 += f0 >> 28
            f0 &= _MASK
        if g0 >= _FOLD:
            g1 += g0 >> 28
            g0 &= _MASK
        if b0 >= _FOLD:
            b1 += b0 >> 28
            b0 &= _MASK
        if c0 >= _FOLD:
            c1 += c0 >> 28
            c0 &= _MASK
        if e0 >= _FOLD:
            e1 += e0 >> 28
            e0 &= _MASK
        if a0 >= _FOLD:
            a1 += a0 >> 28
            a0 &= _MASK
        k += m
    acc[0] = a0
    acc[1] = a1
    acc[2] = b0
    acc[3] = b1
    acc[4] = c0
    acc[5] = c1
    acc[6] = e0
    acc[7] = e1
    acc[8] = f0
    acc[9] = f1
    acc[10] = g0
    acc[11] = g1


def rising_crossings(buf, lut, m, jv, frames, level, out):
    """Frame indices (into out, an int array) where input jv rises through
    `level` (linear units), with 1/256-frame interpolation: out holds
    crossing positions * 256. Returns how many were found."""
    n = 0
    cap = len(out)
    prev = lut[buf[jv]]
    k = 1
    i = m + jv
    while k < frames and n < cap:
        x = lut[buf[i]]
        if prev < level <= x:
            out[n] = (k - 1) * 256 + ((level - prev) * 256) // (x - prev)
            n += 1
        prev = x
        k += 1
        i += m
    return n


def extremes(buf, m, j, k0, k1, out):
    """out[0], out[1] <- the lowest and highest raw code of input j over
    frames k0..k1-1 (raw codes: the table is monotonic, so the caller looks
    the two up instead of every sample)."""
    i = k0 * m + j
    end = k1 * m + j
    lo = 65535
    hi = 0
    while i < end:
        x = buf[i]
        if x < lo:
            lo = x
        if x > hi:
            hi = x
        i += m
    out[0] = lo
    out[1] = hi
