/* GGUF block quantizers in C: the CPU backend of the `gguf_quantize` / `gguf_dequantize` kernels.
 *
 * The reference is qtool/formats/gguf/quants.py (pure torch); this file computes the same bytes,
 * operation for operation in float32, for Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K, without
 * an importance matrix (llama.cpp's quantize_row_*_ref) and with one (quantize_row_*_impl with
 * quant_weights; Q8_0 ignores it). tests/test_kernels_gguf.py holds it byte-equal to the reference.
 * Exactness needs IEEE float32 arithmetic without contraction: build with -ffp-contract=off and
 * without -ffast-math (setup.py does).
 *
 * Rows containing NaN or inf are not quantized here: the functions return the first such row so
 * the caller can run the reference on it (the reference pins C's undefined corners explicitly).
 *
 * Plain C ABI, called through ctypes (which releases the GIL, so Python threads split the rows).
 * The module-init stub at the end only exists so that setuptools can build the file as an
 * extension module; nothing is called through the Python C API.
 */
#ifdef QTOOL_PYTHON_MODULE
#include <Python.h>  /* first, as CPython asks; only for the module-init stub at the end */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

#define QK 32
#define QKK 256
#define GROUP_MAX_EPS 1e-15f

/* ---- scalar helpers -------------------------------------------------------------------------- */

static inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* round to nearest (ties to even) via the 1.5*2^23 trick, bit for bit also beyond 2^22 */
static inline int nearest_int(float v) {
    float val = v + 12582912.f;
    int32_t i; memcpy(&i, &val, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* float32 -> IEEE half, round to nearest even; NaN -> sign | 0x7E00 */
static uint16_t to_fp16(float f) {
    uint32_t x = fbits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x47800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (x < 0x38800000u) {            /* half subnormal or zero: let a float add do the rounding */
        float a = bitsf(x) + 0.5f;
        return sign | (uint16_t)(fbits(a) - 0x3f000000u);
    }
    uint32_t odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;           /* re-bias the exponent (-112 << 23) and round */
    return sign | (uint16_t)(x >> 13);
}

static float from_fp16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f;   /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31) return bitsf(sign | 0x7f800000u | (m << 13));
    return bitsf(sign | ((e + 112) << 23) | (m << 13));
}

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* C's (int8_t)f as GCC emits it on x86-64, for finite f: cvttss2si, low byte */
static inline int c_int8(float v) {
    int32_t i = (fabsf(v) < 2147483648.f) ? (int32_t)v : INT32_MIN;
    return (int8_t)(uint8_t)(i & 0xff);
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* ---- scale searches ---------------------------------------------------------------------------- */

/* signed value of the largest |x| (first on ties); *amax its magnitude */
static float signed_absmax(const float *x, int n, float *amax_out) {
    float amax = 0.f, mx = 0.f;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; mx = x[i]; }
    }
    *amax_out = amax;
    return mx;
}

/* make_qx_quants(rmse_type 1): weights qw[i], or x*x where qw is NULL; L in 0..2*nmax-1 */
static float qx_quants(int n, int nmax, const float *x, const float *qw, uint8_t *L) {
    float amax, mx = signed_absmax(x, n, &amax);
    if (amax < GROUP_MAX_EPS) { memset(L, 0, (size_t)n); return 0.f; }
    float iscale = (float)(-nmax) / mx;
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (uint8_t)(l + nmax);
        float w = qw ? qw[i] : x[i] * x[i];
        float wx = w * x[i];
        sumlx += wx * (float)l;
        suml2 += (w * (float)l) * (float)l;
    }
    float scale = suml2 != 0.f ? sumlx / suml2 : 0.f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        float c = -((float)nmax + 0.1f * (float)is);
        iscale = c / mx;
        float slx = 0.f, sl2 = 0.f;
        for (int i = 0; i < n; ++i) {
            int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
            float w = qw ? qw[i] : x[i] * x[i];
            float wx = w * x[i];
            slx += wx * (float)l;
            sl2 += (w * (float)l) * (float)l;
        }
        if (sl2 > 0.f && slx * slx > best * sl2) {
            for (int i = 0; i < n; ++i)
                L[i] = (uint8_t)(nmax + imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i]))));
            scale = slx / sl2;
            best = scale * slx;
        }
    }
    return scale;
}

/* make_q3_quants(do_rmse): L in 0..2*nmax-1 */
static float q3_quants(int n, int nmax, const float *x, uint8_t *Lout) {
    float amax, mx = signed_absmax(x, n, &amax);
    if (amax < GROUP_MAX_EPS) { memset(Lout, 0, (size_t)n); return 0.f; }
    float iscale = (float)(-nmax) / mx;
    int L[16];
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        L[i] = imax(-nmax, imin(nmax - 1, nearest_int(x[i] * iscale)));
        float w = x[i] * x[i];
        sumlx += (w * x[i]) * (float)L[i];
        suml2 += (w * (float)L[i]) * (float)L[i];
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i], wx = w * x[i], li = (float)L[i];
            float slx = sumlx - wx * li;
            float sl2 = suml2 - (w * li) * li;
            if (!(slx > 0.f)) continue;
            int nl = imax(-nmax, imin(nmax - 1, nearest_int((x[i] * sl2) / slx)));
            if (nl == L[i]) continue;
            float slx2 = slx + wx * (float)nl;
            float sl22 = sl2 + (w * (float)nl) * (float)nl;
            if (sl22 > 0.f && (slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22) {
                L[i] = nl; sumlx = slx2; suml2 = sl22; changed = 1;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) Lout[i] = (uint8_t)(L[i] + nmax);
    return suml2 > 0.f ? sumlx / suml2 : 0.f;
}

/* make_qkx2_quants: affine search; returns the scale, *the_min = -min (>= 0), L in 0..nmax. Also
 * make_qkx3_quants, which the importance paths call: for non-NULL weights and finite x the two are
 * the same operations (qkx3's `max <= min` is qkx2's !(max > min) there) */
static float qkx2_quants(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                         float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[32];
    float mn = x[0], mx = x[0];
    float sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (mn > 0.f) mn = 0.f;
    if (!(mx > mn)) { memset(L, 0, (size_t)n); *the_min = -mn; return 0.f; }
    float iscale = (float)nmax / (mx - mn);
    float scale = 1.f / iscale;
    float best = 0.f;
    for (int i = 0; i < n; ++i) {
        int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - mn))));
        L[i] = (uint8_t)l;
        float diff = scale * (float)l + mn - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        float c = rmin + rdelta * (float)is + (float)nmax;
        iscale = c / (mx - mn);
        float sum_l = 0.f, sum_l2 = 0.f, sum_xl = 0.f;
        for (int i = 0; i < n; ++i) {
            int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - mn))));
            Laux[i] = (uint8_t)l;
            float wl = w[i] * (float)l;
            sum_l += wl;
            sum_l2 += wl * (float)l;
            sum_xl += wl * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0.f)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0.f) { this_min = 0.f; this_scale = sum_xl / sum_l2; }
        float err = 0.f;
        for (int i = 0; i < n; ++i) {
            float diff = (float)Laux[i] * this_scale + this_min - x[i];
            diff = use_mad ? fabsf(diff) : diff * diff;
            err += w[i] * diff;
        }
        if (err < best) {
            memcpy(L, Laux, (size_t)n);
            best = err; scale = this_scale; mn = this_min;
        }
    }
    *the_min = -mn;
    return scale;
}


/* make_qp_quants: non-negative x (a super-block's scales or mins) on 0..nmax with weights qw.
 * L is stored as uint8_t like llama.cpp's: the first candidate's levels are not clamped (they wrap),
 * and the wrapped values are what the refinement starts from. */
static float qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float mx = 0.f;
    for (int i = 0; i < n; ++i) mx = mx > x[i] ? mx : x[i];
    if (mx < GROUP_MAX_EPS) { memset(L, 0, (size_t)n); return 0.f; }
    float iscale = (float)nmax / mx;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1.f / iscale;
    float best = 0.f;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * (float)L[i];
        best += (qw[i] * diff) * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float isc = (0.1f * (float)is + (float)nmax) / mx;
        float sc = 1.f / isc;
        float mse = 0.f;
        for (int i = 0; i < n; ++i) {
            int l = imin(nmax, nearest_int(isc * x[i]));
            float diff = x[i] - sc * (float)l;
            mse += (qw[i] * diff) * diff;
        }
        if (mse < best) { best = mse; iscale = isc; }
    }
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        int l = imin(nmax, nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += (qw[i] * x[i]) * (float)l;
        suml2 += (qw[i] * (float)l) * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = qw[i], wx = w * x[i], li = (float)L[i];
            float slx = sumlx - wx * li;
            float sl2 = suml2 - (w * li) * li;
            if (!(slx > 0.f && sl2 > 0.f)) continue;
            int nl = imin(nmax, nearest_int((x[i] * sl2) / slx));
            if (nl == (int)L[i]) continue;
            slx += wx * (float)nl;
            sl2 += (w * (float)nl) * (float)nl;
            if ((slx * slx) * suml2 > (sumlx * sumlx) * sl2) {
                L[i] = (uint8_t)nl; sumlx = slx; suml2 = sl2; changed = 1;
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.f ? sumlx / suml2 : 0.f;
}

/* ---- the same searches over 8 sub-blocks at once (GCC/Clang vector extensions) ------------------
 * Lane b is sub-block b; every lane does exactly the scalar code's operations in the same order
 * (sums stay sequential per lane), so the bytes are the same; only independent sub-blocks share an
 * instruction. Element-major input: xt[i][b] = element i of sub-block b. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(QTOOL_SCALAR_ONLY)
#define QTOOL_VEC 1
#define QTOOL_VEC_X86 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static ALWAYS_INLINE v8f vsplat(float a) { return (v8f){a, a, a, a, a, a, a, a}; }
static ALWAYS_INLINE v8i isplat(int32_t a) { return (v8i){a, a, a, a, a, a, a, a}; }
static ALWAYS_INLINE v8f fsel(v8i m, v8f a, v8f b) { return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }
static ALWAYS_INLINE v8i isel(v8i m, v8i a, v8i b) { return (m & a) | (~m & b); }
static ALWAYS_INLINE v8i vnearest(v8f v) { v8f t = v + vsplat(12582912.f); return ((v8i)t & isplat(0x007fffff)) - isplat(0x00400000); }
static ALWAYS_INLINE v8i iclamp(v8i v, int lo, int hi) {
    v8i l = isplat(lo), h = isplat(hi);
    v = isel(v < l, l, v);
    return isel(v > h, h, v);
}
static ALWAYS_INLINE v8f i2f(v8i v) { return __builtin_convertvector(v, v8f); }
static ALWAYS_INLINE v8f vabs(v8f v) { return (v8f)((v8i)v & isplat(0x7fffffff)); }

/* qkx2_quants on 8 lanes of n elements: scale[b], the_min[b], L[i][b] */
static ALWAYS_INLINE void qkx2_quants_x8(int n, int nmax, const v8f *x, const v8f *w, v8i *L, v8f *scale_out, v8f *min_out,
                           float rmin, float rdelta, int nstep, int use_mad) {
    v8i Laux[32];
    v8f mn = x[0], mx = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; ++i) {
        mn = fsel(x[i] < mn, x[i], mn);
        mx = fsel(x[i] > mx, x[i], mx);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    v8f zero = vsplat(0.f);
    mn = fsel(mn > zero, zero, mn);
    v8f mn0 = mn;
    v8i degenerate = ~(mx > mn);
    v8f iscale = vsplat((float)nmax) / (mx - mn);
    v8f scale = vsplat(1.f) / iscale;
    v8f best = zero;
    for (int i = 0; i < n; ++i) {
        v8i l = iclamp(vnearest(iscale * (x[i] - mn)), 0, nmax);
        L[i] = l;
        v8f diff = scale * i2f(l) + mn - x[i];
        diff = use_mad ? vabs(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        float c = rmin + rdelta * (float)is + (float)nmax;
        iscale = vsplat(c) / (mx - mn);
        v8f sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            v8i l = iclamp(vnearest(iscale * (x[i] - mn)), 0, nmax);
            Laux[i] = l;
            v8f lf = i2f(l), wl = w[i] * lf;
            sum_l += wl;
            sum_l2 += wl * lf;
            sum_xl += wl * x[i];
        }
        v8f D = sum_w * sum_l2 - sum_l * sum_l;
        v8i ok = D > zero;
        if (!(ok[0] | ok[1] | ok[2] | ok[3] | ok[4] | ok[5] | ok[6] | ok[7])) continue;
        v8f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        v8f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        v8i pos = this_min > zero;
        this_min = fsel(pos, zero, this_min);
        this_scale = fsel(pos, sum_xl / sum_l2, this_scale);
        v8f err = zero;
        for (int i = 0; i < n; ++i) {
            v8f diff = i2f(Laux[i]) * this_scale + this_min - x[i];
            diff = use_mad ? vabs(diff) : diff * diff;
            err += w[i] * diff;
        }
        v8i take = ok & (err < best);
        for (int i = 0; i < n; ++i) L[i] = isel(take, Laux[i], L[i]);
        best = fsel(take, err, best);
        scale = fsel(take, this_scale, scale);
        mn = fsel(take, this_min, mn);
    }
    for (int i = 0; i < n; ++i) L[i] = isel(degenerate, isplat(0), L[i]);
    *scale_out = fsel(degenerate, zero, scale);
    *min_out = -fsel(degenerate, mn0, mn);
}

/* qx_quants on 8 lanes of n (<= 32) elements, weights w (NULL: x*x): scale[b], L[i][b] in 0..2*nmax-1 */
static ALWAYS_INLINE v8f qx_quants_x8(int n, int nmax, const v8f *x, const v8f *w, v8i *L) {
    v8f zero = vsplat(0.f), amax = zero, mx = zero;
    for (int i = 0; i < n; ++i) {
        v8f ax = vabs(x[i]);
        v8i upd = ax > amax;
        amax = fsel(upd, ax, amax);
        mx = fsel(upd, x[i], mx);
    }
    v8i zblock = amax < vsplat(GROUP_MAX_EPS);
    v8f xx[32], wx[32];
    for (int i = 0; i < n; ++i) { xx[i] = w ? w[i] : x[i] * x[i]; wx[i] = xx[i] * x[i]; }
    v8f iscale = vsplat((float)(-nmax)) / mx;
    v8f sumlx = zero, suml2 = zero;
    for (int i = 0; i < n; ++i) {
        v8i l = iclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
        L[i] = l + isplat(nmax);
        v8f lf = i2f(l);
        sumlx += wx[i] * lf;
        suml2 += (xx[i] * lf) * lf;
    }
    v8f scale = fsel(suml2 != zero, sumlx / suml2, zero);
    v8f best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        float c = -((float)nmax + 0.1f * (float)is);
        iscale = vsplat(c) / mx;
        v8f slx = zero, sl2 = zero;
        v8i Lc[32];
        for (int i = 0; i < n; ++i) {
            v8i l = iclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
            Lc[i] = l;
            v8f lf = i2f(l);
            slx += wx[i] * lf;
            sl2 += (xx[i] * lf) * lf;
        }
        v8i take = (sl2 > zero) & (slx * slx > best * sl2);
        for (int i = 0; i < n; ++i) L[i] = isel(take, Lc[i] + isplat(nmax), L[i]);
        scale = fsel(take, slx / sl2, scale);
        best = fsel(take, scale * slx, best);
    }
    for (int i = 0; i < n; ++i) L[i] = isel(zblock, isplat(0), L[i]);
    return fsel(zblock, zero, scale);
}
#endif

/* ---- one block / super-block of each type ------------------------------------------------------ */

static void q8_0_block(const float *x, uint8_t *y) {
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) { float a = fabsf(x[j]); if (a > amax) amax = a; }
    float d = amax / 127.f;
    float id = d != 0.f ? 1.f / d : 0.f;
    put16(y, to_fp16(d));
    for (int j = 0; j < QK; ++j) y[2 + j] = (uint8_t)c_int8(roundf(x[j] * id));
}

static void q4_0_block(const float *x, uint8_t *y) {
    float amax, mx = signed_absmax(x, QK, &amax);
    float d = mx / -8.f;
    float id = d != 0.f ? 1.f / d : 0.f;
    put16(y, to_fp16(d));
    for (int j = 0; j < 16; ++j) {
        int a = imin(15, c_int8(x[j] * id + 8.5f)), b = imin(15, c_int8(x[j + 16] * id + 8.5f));
        y[2 + j] = (uint8_t)((a & 0xff) | ((b & 0xf) << 4));
    }
}

static void q5_0_block(const float *x, uint8_t *y) {
    float amax, mx = signed_absmax(x, QK, &amax);
    float d = mx / -16.f;
    float id = d != 0.f ? 1.f / d : 0.f;
    put16(y, to_fp16(d));
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        int a = imin(31, c_int8(x[j] * id + 16.5f)), b = imin(31, c_int8(x[j + 16] * id + 16.5f));
        y[6 + j] = (uint8_t)((a & 0xf) | ((b & 0xf) << 4));
        qh |= (uint32_t)((a >> 4) & 1) << j;
        qh |= (uint32_t)((b >> 4) & 1) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) y[2 + k] = (uint8_t)(qh >> (8 * k));
}

static void q41_block(const float *x, uint8_t *y, int nmax) {
    float mn = x[0], mx = x[0];
    for (int j = 1; j < QK; ++j) { if (x[j] < mn) mn = x[j]; if (x[j] > mx) mx = x[j]; }
    float d = (mx - mn) / (float)nmax;
    float id = d != 0.f ? 1.f / d : 0.f;
    put16(y, to_fp16(d));
    put16(y + 2, to_fp16(mn));
    if (nmax == 15) {
        for (int j = 0; j < 16; ++j) {
            int a = imin(15, c_int8((x[j] - mn) * id + 0.5f)), b = imin(15, c_int8((x[j + 16] - mn) * id + 0.5f));
            y[4 + j] = (uint8_t)((a & 0xff) | ((b & 0xf) << 4));
        }
        return;
    }
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        int a = c_int8((x[j] - mn) * id + 0.5f), b = c_int8((x[j + 16] - mn) * id + 0.5f);
        y[8 + j] = (uint8_t)((a & 0xf) | ((b & 0xf) << 4));
        qh |= (uint32_t)((a >> 4) & 1) << j;
        qh |= (uint32_t)((b >> 4) & 1) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) y[4 + k] = (uint8_t)(qh >> (8 * k));
}

static void q4_1_block(const float *x, uint8_t *y) { q41_block(x, y, 15); }
static void q5_1_block(const float *x, uint8_t *y) { q41_block(x, y, 31); }

static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QKK; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* The K types' ends, shared by both paths: with the packed sub-block scales already in y, requantize
 * every sub-block whose stored scale is non-zero against the fp16-rounded (d, dmin), and pack. */

static void q2_K_finish(const float *x, uint8_t *L, uint8_t *y, uint16_t db, uint16_t mb) {
    const uint8_t *sc = y;
    float dv = from_fp16(db), mv = from_fp16(mb);
    for (int j = 0; j < 16; ++j) {
        float d = dv * (float)(sc[j] & 0xf);
        if (d == 0.f) continue;
        float dm = mv * (float)(sc[j] >> 4);
        for (int i = 0; i < 16; ++i)
            L[16 * j + i] = (uint8_t)imax(0, imin(3, nearest_int((x[16 * j + i] + dm) / d)));
    }
    pack_2bit(L, y + 16);
    put16(y + 80, db);
    put16(y + 82, mb);
}

static void q3_K_finish(const float *x, uint8_t *L, uint8_t *y, uint16_t db) {
    uint8_t *hm = y, *qs = y + 32;
    const uint8_t *sc = y + 96;
    float dv = from_fp16(db);
    for (int j = 0; j < 16; ++j) {
        int s = j < 8 ? (sc[j] & 0xf) : (sc[j - 8] >> 4);
        s = (s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
        float d = dv * (float)s;
        if (d == 0.f) continue;
        for (int i = 0; i < 16; ++i)
            L[16 * j + i] = (uint8_t)(imax(-4, imin(3, nearest_int(x[16 * j + i] / d))) + 4);
    }
    memset(hm, 0, 32);
    for (int j = 0; j < QKK; ++j)
        if (L[j] > 3) { hm[j % 32] |= (uint8_t)(1u << (j / 32)); L[j] -= 4; }
    pack_2bit(L, qs);
    put16(y + 108, db);
}

/* ls, lm: the 6-bit sub-block scales and mins as uint8_t (llama.cpp packs them with byte arithmetic,
 * so larger values, possible on the importance path of Q4_K, spill into the neighbouring bits alike) */
static void q45_K_finish(const float *x, uint8_t *L, uint8_t *y, int nmax, const uint8_t *ls, const uint8_t *lm,
                         uint16_t db, uint16_t mb) {
    uint8_t *sc = y + 4;
    for (int j = 0; j < 8; ++j) {
        if (j < 4) { sc[j] = ls[j]; sc[j + 4] = lm[j]; }
        else {
            sc[j + 4] = (uint8_t)((ls[j] & 0xf) | ((lm[j] & 0xf) << 4));
            sc[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            sc[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    put16(y, db);
    put16(y + 2, mb);
    float dv = from_fp16(db), mv = from_fp16(mb);
    for (int j = 0; j < 8; ++j) {
        int s, m;
        if (j < 4) { s = sc[j] & 63; m = sc[j + 4] & 63; }
        else { s = (sc[j + 4] & 0xf) | ((sc[j - 4] >> 6) << 4); m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4); }
        float d = dv * (float)s;
        if (d == 0.f) continue;
        float dm = mv * (float)m;
        for (int i = 0; i < 32; ++i)
            L[32 * j + i] = (uint8_t)imax(0, imin(nmax, nearest_int((x[32 * j + i] + dm) / d)));
    }
    if (nmax == 15) {
        uint8_t *q = y + 16;
        for (int j = 0; j < QKK; j += 64)
            for (int l = 0; l < 32; ++l) *q++ = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        return;
    }
    uint8_t *qh = y + 16, *ql = y + 48;
    memset(qh, 0, 32);
    int m1 = 1, m2 = 2;
    for (int n = 0; n < QKK; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j], l2 = L[n + j + 32];
            if (l1 > 15) { l1 -= 16; qh[j] |= (uint8_t)m1; }
            if (l2 > 15) { l2 -= 16; qh[j] |= (uint8_t)m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
        m1 <<= 2; m2 <<= 2; ql += 32;
    }
}

#ifdef QTOOL_VEC
/* 8 sub-blocks of n elements, starting at sub-block 8*g, element-major (lane b = sub-block 8*g+b) */
static ALWAYS_INLINE void gather8(const float *x, int n, int g, v8f *xt) {
    for (int i = 0; i < n; ++i)
        for (int b = 0; b < 8; ++b) xt[i][b] = x[n * (8 * g + b) + i];
}

/* the inverse for codes: lane b of Lt back to sub-block 8*g+b of L */
static ALWAYS_INLINE void scatter8(const v8i *Lt, int n, int g, uint8_t *L) {
    for (int b = 0; b < 8; ++b)
        for (int i = 0; i < n; ++i) L[n * (8 * g + b) + i] = (uint8_t)Lt[i][b];
}
#endif

/* ---- the K types without an importance matrix (quantize_row_*_ref) ---- */

static ALWAYS_INLINE void q2_K_impl(const float *x, uint8_t *y, int vec) {
    (void)vec;
    uint8_t L[QKK], *sc = y;
    float w[16], scales[16], mins[16], max_scale = 0.f, max_min = 0.f;
#ifdef QTOOL_VEC
    if (vec) {
    for (int g = 0; g < 2; ++g) {
        v8f xt[16], wt[16], sv, mv;
        v8i Lt[16];
        gather8(x, 16, g, xt);
        for (int i = 0; i < 16; ++i) wt[i] = vabs(xt[i]);
        qkx2_quants_x8(16, 3, xt, wt, Lt, &sv, &mv, -0.5f, 0.1f, 15, 1);
        for (int b = 0; b < 8; ++b) { scales[8 * g + b] = sv[b]; mins[8 * g + b] = mv[b]; }
        scatter8(Lt, 16, g, L);
    }
    (void)w;
    } else
#endif
    {
    for (int j = 0; j < 16; ++j) {
        for (int l = 0; l < 16; ++l) w[l] = fabsf(x[16 * j + l]);
        scales[j] = qkx2_quants(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1);
    }
    }
    for (int j = 0; j < 16; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint16_t db = 0, mb = 0;
    if (max_scale > 0.f) {
        float is = 15.f / max_scale;
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(is * scales[j]);
        db = to_fp16(max_scale / 15.f);
    } else memset(sc, 0, 16);
    if (max_min > 0.f) {
        float is = 15.f / max_min;
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(sc[j] | (nearest_int(is * mins[j]) << 4));
        mb = to_fp16(max_min / 15.f);
    }
    q2_K_finish(x, L, y, db, mb);
}

static void q3_K_block(const float *x, uint8_t *y) {
    uint8_t L[QKK], *sc = y + 96;
    float scales[16], amax = 0.f, max_scale = 0.f;
    for (int j = 0; j < 16; ++j) {
        scales[j] = q3_quants(16, 4, x + 16 * j, L + 16 * j);
        float a = fabsf(scales[j]);
        if (a > amax) { amax = a; max_scale = scales[j]; }
    }
    memset(sc, 0, 12);
    uint16_t db = 0;
    if (max_scale != 0.f) {
        float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; ++j) {
            int l = (int8_t)(uint8_t)(nearest_int(iscale * scales[j]) & 0xff);
            l = imax(-32, imin(31, l)) + 32;
            if (j < 8) sc[j] = (uint8_t)(l & 0xf); else sc[j - 8] |= (uint8_t)((l & 0xf) << 4);
            sc[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
        }
        db = to_fp16(1.f / iscale);
    }
    q3_K_finish(x, L, y, db);
}

static ALWAYS_INLINE void q45_K_impl(const float *x, uint8_t *y, int nmax, int vec) {
    (void)vec;
    uint8_t L[QKK], ls[8], lm[8];
    float w[32], scales[8], mins[8], max_scale = 0.f, max_min = 0.f;
#ifdef QTOOL_VEC
    if (vec) {
    {
        v8f xt[32], wt[32], sv, mv;
        v8i Lt[32];
        gather8(x, 32, 0, xt);
        v8f s2 = vsplat(0.f);
        for (int i = 0; i < 32; ++i) s2 += xt[i] * xt[i];
        v8f q = s2 / vsplat(32.f), av;
        for (int b = 0; b < 8; ++b) av[b] = sqrtf(q[b]);
        for (int i = 0; i < 32; ++i) wt[i] = av + vabs(xt[i]);
        if (nmax == 15) qkx2_quants_x8(32, 15, xt, wt, Lt, &sv, &mv, -1.f, 0.1f, 20, 0);
        else qkx2_quants_x8(32, 31, xt, wt, Lt, &sv, &mv, -0.5f, 0.1f, 15, 0);
        for (int b = 0; b < 8; ++b) { scales[b] = sv[b]; mins[b] = mv[b]; }
        scatter8(Lt, 32, 0, L);
        (void)w;
    }
    for (int j = 0; j < 8; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    } else
#endif
    {
    for (int j = 0; j < 8; ++j) {
        const float *xb = x + 32 * j;
        float s2 = 0.f;
        for (int l = 0; l < 32; ++l) s2 += xb[l] * xb[l];
        float av = sqrtf(s2 / 32.f);
        for (int l = 0; l < 32; ++l) w[l] = av + fabsf(xb[l]);
        if (nmax == 15) scales[j] = qkx2_quants(32, 15, xb, w, L + 32 * j, &mins[j], -1.f, 0.1f, 20, 0);
        else scales[j] = qkx2_quants(32, 31, xb, w, L + 32 * j, &mins[j], -0.5f, 0.1f, 15, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    }
    float inv_s = max_scale > 0.f ? 63.f / max_scale : 0.f;
    float inv_m = max_min > 0.f ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        ls[j] = (uint8_t)nearest_int(inv_s * scales[j]);
        lm[j] = (uint8_t)nearest_int(inv_m * mins[j]);
        if (ls[j] > 63) ls[j] = 63;
        if (lm[j] > 63) lm[j] = 63;
    }
    q45_K_finish(x, L, y, nmax, ls, lm, to_fp16(max_scale / 63.f), to_fp16(max_min / 63.f));
}

/* Q6_K: qw is the importance matrix's 256 values for this super-block (llama.cpp weighs Q6_K's
 * sub-block search with them directly, without the sigma2 term), or NULL */
static ALWAYS_INLINE void q6_K_impl(const float *x, const float *qw, uint8_t *y, int vec) {
    (void)vec;
    uint8_t L[QKK], *ql = y, *qh = y + 128;
    int8_t *sc = (int8_t *)(y + 192);
    float scales[16], amax = 0.f, max_scale = 0.f;
#ifdef QTOOL_VEC
    if (vec) {
    for (int g = 0; g < 2; ++g) {
        v8f xt[16], wt[16];
        v8i Lt[16];
        gather8(x, 16, g, xt);
        if (qw) gather8(qw, 16, g, wt);
        v8f sv = qx_quants_x8(16, 32, xt, qw ? wt : NULL, Lt);
        for (int b = 0; b < 8; ++b) scales[8 * g + b] = sv[b];
        scatter8(Lt, 16, g, L);
    }
    } else
#endif
    {
    for (int j = 0; j < 16; ++j) scales[j] = qx_quants(16, 32, x + 16 * j, qw ? qw + 16 * j : NULL, L + 16 * j);
    }
    for (int j = 0; j < 16; ++j) {
        float a = fabsf(scales[j]);
        if (a > amax) { amax = a; max_scale = scales[j]; }
    }
    if (amax < GROUP_MAX_EPS) { memset(y, 0, 210); return; }
    float iscale = -128.f / max_scale;
    uint16_t db = to_fp16(1.f / iscale);
    put16(y + 208, db);
    float dv = from_fp16(db);
    for (int j = 0; j < 16; ++j) sc[j] = (int8_t)(uint8_t)(imin(127, nearest_int(iscale * scales[j])) & 0xff);
    for (int j = 0; j < 16; ++j) {
        float d = dv * (float)imin(127, nearest_int(iscale * scales[j]));
        if (d == 0.f) continue;
        for (int i = 0; i < 16; ++i)
            L[16 * j + i] = (uint8_t)(imax(-32, imin(31, nearest_int(x[16 * j + i] / d))) + 32);
    }
    for (int j = 0; j < QKK; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t *a = L + j + l;
            ql[l] = (uint8_t)((a[0] & 0xf) | ((a[64] & 0xf) << 4));
            ql[l + 32] = (uint8_t)((a[32] & 0xf) | ((a[96] & 0xf) << 4));
            qh[l] = (uint8_t)((a[0] >> 4) | ((a[32] >> 4) << 2) | ((a[64] >> 4) << 4) | ((a[96] >> 4) << 6));
        }
        ql += 64; qh += 32;
    }
}

/* ---- with an importance matrix (quantize_row_*_impl) ------------------------------------------
 * qw: the importance matrix's values for the block's columns. Q2_K..Q5_K weigh element i of a
 * super-block by qw[i] * sqrt(sigma2 + x[i]^2), sigma2 the super-block's mean x^2 (Q3_K..Q5_K: twice
 * it); the scale searches take those weights, and the sub-block scales and mins are themselves
 * quantized by a search weighted with each sub-block's summed weight. */

/* weights of one super-block; sw[j] = the sum of sub-block j's (sub-blocks of `sub` elements) */
static void k_weights(const float *x, const float *qw, float sigma2_mul, int sub, float *w, float *sw) {
    float sumx2 = 0.f;
    for (int j = 0; j < QKK; ++j) sumx2 += x[j] * x[j];
    float sigma2 = sigma2_mul * sumx2 / (float)QKK;
    for (int j = 0; j < QKK; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    for (int j = 0; j < QKK / sub; ++j) {
        float s = 0.f;
        for (int l = 0; l < sub; ++l) s += w[sub * j + l];
        sw[j] = s;
    }
}

/* The affine (scale + min) search of each sub-block of `sub` weights in a super-block, the part
 * Q2_K (16 x 16) and Q4_K/Q5_K (8 x 32) share; the AVX2 build runs 8 sub-blocks per instruction. */
static ALWAYS_INLINE void k_affine_subblocks(const float *x, const float *w, int sub, int nmax, uint8_t *L, float *scales,
                                             float *mins, int vec) {
    (void)vec;
#ifdef QTOOL_VEC
    if (vec) {
        for (int g = 0; g < QKK / sub / 8; ++g) {
            v8f xt[32], wt[32], sv, mv;
            v8i Lt[32];
            gather8(x, sub, g, xt);
            gather8(w, sub, g, wt);
            qkx2_quants_x8(sub, nmax, xt, wt, Lt, &sv, &mv, -0.9f, 0.05f, 36, 0);
            for (int b = 0; b < 8; ++b) { scales[8 * g + b] = sv[b]; mins[8 * g + b] = mv[b]; }
            scatter8(Lt, sub, g, L);
        }
        return;
    }
#endif
    for (int j = 0; j < QKK / sub; ++j)
        scales[j] = qkx2_quants(sub, nmax, x + sub * j, w + sub * j, L + sub * j, &mins[j], -0.9f, 0.05f, 36, 0);
}

static ALWAYS_INLINE void q2_K_w_impl(const float *x, const float *qw, uint8_t *y, int vec) {
    uint8_t L[QKK], Ls[16], Lm[16];
    float w[QKK], sw[16], scales[16], mins[16];
    k_weights(x, qw, 1.f, 16, w, sw);
    k_affine_subblocks(x, w, 16, 3, L, scales, mins, vec);
    float dm = qp_quants(16, 15, scales, Ls, sw);
    float mm = qp_quants(16, 15, mins, Lm, sw);
    for (int j = 0; j < 16; ++j) y[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    q2_K_finish(x, L, y, to_fp16(dm), to_fp16(mm));
}

static ALWAYS_INLINE void q3_K_w_impl(const float *x, const float *qw, uint8_t *y, int vec) {
    (void)vec;
    uint8_t L[QKK], Ls[16], *sc = y + 96;
    float w[QKK], sw[16], scales[16];
    k_weights(x, qw, 2.f, 16, w, sw);
#ifdef QTOOL_VEC
    if (vec) {
    for (int g = 0; g < 2; ++g) {
        v8f xt[16], wt[16];
        v8i Lt[16];
        gather8(x, 16, g, xt);
        gather8(w, 16, g, wt);
        v8f sv = qx_quants_x8(16, 4, xt, wt, Lt);
        for (int b = 0; b < 8; ++b) scales[8 * g + b] = sv[b];
        scatter8(Lt, 16, g, L);
    }
    } else
#endif
    {
    for (int j = 0; j < 16; ++j) scales[j] = qx_quants(16, 4, x + 16 * j, w + 16 * j, L + 16 * j);
    }
    float d = qx_quants(16, 32, scales, sw, Ls);
    memset(sc, 0, 12);
    for (int j = 0; j < 16; ++j) {
        int l = Ls[j];
        if (j < 8) sc[j] = (uint8_t)(l & 0xf); else sc[j - 8] |= (uint8_t)((l & 0xf) << 4);
        sc[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
    }
    q3_K_finish(x, L, y, to_fp16(d));
}

static ALWAYS_INLINE void q45_K_w_impl(const float *x, const float *qw, uint8_t *y, int nmax, int vec) {
    uint8_t L[QKK], Ls[8], Lm[8];
    float w[QKK], sw[8], scales[8], mins[8];
    k_weights(x, qw, 2.f, 32, w, sw);
    k_affine_subblocks(x, w, 32, nmax, L, scales, mins, vec);
    float d = qp_quants(8, 63, scales, Ls, sw);
    float m = qp_quants(8, 63, mins, Lm, sw);
    if (nmax == 31)
        for (int j = 0; j < 8; ++j) { if (Ls[j] > 63) Ls[j] = 63; if (Lm[j] > 63) Lm[j] = 63; }
    q45_K_finish(x, L, y, nmax, Ls, Lm, to_fp16(d), to_fp16(m));
}

/* Legacy types with an importance matrix, one whole row (sigma2 is the row's mean x^2): Q4_0/Q5_0
 * search a symmetric scale (make_qx_quants), Q4_1/Q5_1 an affine one (make_qkx3_quants); the AVX2
 * build runs 8 consecutive blocks per instruction and the row's last nb % 8 blocks scalar. */
static void legacy_pack(int type, const uint8_t *L, float d, float the_min, uint8_t *y) {
    put16(y, to_fp16(d));
    if (type == 3 || type == 7) put16(y + 2, to_fp16(-the_min));
    if (type == 2 || type == 3) {
        uint8_t *qs = y + (type == 2 ? 2 : 4);
        for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(L[j] | (L[j + 16] << 4));
        return;
    }
    uint8_t *qh = y + (type == 6 ? 2 : 4), *qs = qh + 4;
    uint32_t h = 0;
    for (int j = 0; j < 16; ++j) {
        qs[j] = (uint8_t)((L[j] & 0xf) | ((L[j + 16] & 0xf) << 4));
        h |= (uint32_t)((L[j] >> 4) & 1) << j;
        h |= (uint32_t)((L[j + 16] >> 4) & 1) << (j + 16);
    }
    for (int k = 0; k < 4; ++k) qh[k] = (uint8_t)(h >> (8 * k));
}

static ALWAYS_INLINE void legacy_w_row(int type, const float *x, const float *qw, int64_t n, uint8_t *y, int vec) {
    (void)vec;
    const int nmax = type == 2 ? 8 : type == 3 ? 15 : type == 6 ? 16 : 31;
    const int affine = type == 3 || type == 7, ts = type == 2 ? 18 : type == 3 ? 20 : type == 6 ? 22 : 24;
    float sum_x2 = 0.f;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    const float sigma2 = sum_x2 / (float)n;
    const int64_t nb = n / QK;
    int64_t ib = 0;
    uint8_t L[QK];
#ifdef QTOOL_VEC
    if (vec) {
    for (; ib + 8 <= nb; ib += 8) {
        const float *xb = x + QK * ib, *qb = qw + QK * ib;
        v8f xt[QK], wt[QK], sv, mv = vsplat(0.f);
        v8i Lt[QK];
        for (int i = 0; i < QK; ++i)
            for (int b = 0; b < 8; ++b) {
                float v = xb[QK * b + i];
                xt[i][b] = v;
                wt[i][b] = qb[QK * b + i] * sqrtf(sigma2 + v * v);
            }
        if (affine) qkx2_quants_x8(QK, nmax, xt, wt, Lt, &sv, &mv, -0.9f, 0.05f, 36, 0);
        else sv = qx_quants_x8(QK, nmax, xt, wt, Lt);
        for (int b = 0; b < 8; ++b) {
            for (int i = 0; i < QK; ++i) L[i] = (uint8_t)Lt[i][b];
            legacy_pack(type, L, sv[b], mv[b], y + (ib + b) * ts);
        }
    }
    }
#endif
    for (; ib < nb; ++ib) {
        const float *xb = x + QK * ib, *qb = qw + QK * ib;
        float w[QK], d, the_min = 0.f;
        for (int j = 0; j < QK; ++j) w[j] = qb[j] * sqrtf(sigma2 + xb[j] * xb[j]);
        if (affine) d = qkx2_quants(QK, nmax, xb, w, L, &the_min, -0.9f, 0.05f, 36, 0);
        else d = qx_quants(QK, nmax, xb, w, L);
        legacy_pack(type, L, d, the_min, y + ib * ts);
    }
}

/* scalar entry points, and the 8-lane ones compiled for AVX2 (picked at run time when the CPU has it;
 * AVX2 brings no FMA, and -ffp-contract=off would forbid contracting anyway: same bytes).
 * The _w ones quantize a whole row of n values with importance qw (n values too). */
static void q2_K_block(const float *x, uint8_t *y) { q2_K_impl(x, y, 0); }
static void q4_K_block(const float *x, uint8_t *y) { q45_K_impl(x, y, 15, 0); }
static void q5_K_block(const float *x, uint8_t *y) { q45_K_impl(x, y, 31, 0); }
static void q6_K_block(const float *x, uint8_t *y) { q6_K_impl(x, NULL, y, 0); }
#define W_ARGS const float *x, const float *qw, int64_t n, uint8_t *y
static void q4_0_row_w(W_ARGS) { legacy_w_row(2, x, qw, n, y, 0); }
static void q4_1_row_w(W_ARGS) { legacy_w_row(3, x, qw, n, y, 0); }
static void q5_0_row_w(W_ARGS) { legacy_w_row(6, x, qw, n, y, 0); }
static void q5_1_row_w(W_ARGS) { legacy_w_row(7, x, qw, n, y, 0); }
static void q2_K_row_w(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 84) q2_K_w_impl(x + i, qw + i, y, 0); }
static void q3_K_row_w(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 110) q3_K_w_impl(x + i, qw + i, y, 0); }
static void q4_K_row_w(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 144) q45_K_w_impl(x + i, qw + i, y, 15, 0); }
static void q5_K_row_w(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 176) q45_K_w_impl(x + i, qw + i, y, 31, 0); }
static void q6_K_row_w(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 210) q6_K_impl(x + i, qw + i, y, 0); }
#ifdef QTOOL_VEC_X86
#define AVX2 __attribute__((target("avx2")))
AVX2 static void q2_K_block_avx2(const float *x, uint8_t *y) { q2_K_impl(x, y, 1); }
AVX2 static void q4_K_block_avx2(const float *x, uint8_t *y) { q45_K_impl(x, y, 15, 1); }
AVX2 static void q5_K_block_avx2(const float *x, uint8_t *y) { q45_K_impl(x, y, 31, 1); }
AVX2 static void q6_K_block_avx2(const float *x, uint8_t *y) { q6_K_impl(x, NULL, y, 1); }
AVX2 static void q4_0_row_w_avx2(W_ARGS) { legacy_w_row(2, x, qw, n, y, 1); }
AVX2 static void q4_1_row_w_avx2(W_ARGS) { legacy_w_row(3, x, qw, n, y, 1); }
AVX2 static void q5_0_row_w_avx2(W_ARGS) { legacy_w_row(6, x, qw, n, y, 1); }
AVX2 static void q5_1_row_w_avx2(W_ARGS) { legacy_w_row(7, x, qw, n, y, 1); }
AVX2 static void q2_K_row_w_avx2(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 84) q2_K_w_impl(x + i, qw + i, y, 1); }
AVX2 static void q3_K_row_w_avx2(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 110) q3_K_w_impl(x + i, qw + i, y, 1); }
AVX2 static void q4_K_row_w_avx2(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 144) q45_K_w_impl(x + i, qw + i, y, 15, 1); }
AVX2 static void q5_K_row_w_avx2(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 176) q45_K_w_impl(x + i, qw + i, y, 31, 1); }
AVX2 static void q6_K_row_w_avx2(W_ARGS) { for (int64_t i = 0; i < n; i += QKK, y += 210) q6_K_impl(x + i, qw + i, y, 1); }
#endif

/* ---- dequantization (gguf-py's / ggml's dequantize_row_*) -------------------------------------- */

static void dq_q8_0(const uint8_t *y, float *x) {
    float d = from_fp16(get16(y));
    for (int j = 0; j < QK; ++j) x[j] = (float)(int8_t)y[2 + j] * d;
}
static void dq_q4_0(const uint8_t *y, float *x) {
    float d = from_fp16(get16(y));
    for (int j = 0; j < 16; ++j) { x[j] = (float)((y[2 + j] & 0xf) - 8) * d; x[j + 16] = (float)((y[2 + j] >> 4) - 8) * d; }
}
static void dq_q4_1(const uint8_t *y, float *x) {
    float d = from_fp16(get16(y)), m = from_fp16(get16(y + 2));
    for (int j = 0; j < 16; ++j) { x[j] = (float)(y[4 + j] & 0xf) * d + m; x[j + 16] = (float)(y[4 + j] >> 4) * d + m; }
}
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }
static void dq_q5_0(const uint8_t *y, float *x) {
    float d = from_fp16(get16(y));
    uint32_t qh = get32(y + 2);
    for (int j = 0; j < 16; ++j) {
        int a = (y[6 + j] & 0xf) | (((qh >> j) & 1) << 4), b = (y[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        x[j] = (float)(a - 16) * d; x[j + 16] = (float)(b - 16) * d;
    }
}
static void dq_q5_1(const uint8_t *y, float *x) {
    float d = from_fp16(get16(y)), m = from_fp16(get16(y + 2));
    uint32_t qh = get32(y + 4);
    for (int j = 0; j < 16; ++j) {
        int a = (y[8 + j] & 0xf) | (((qh >> j) & 1) << 4), b = (y[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        x[j] = (float)a * d + m; x[j + 16] = (float)b * d + m;
    }
}
static void dq_q2_K(const uint8_t *y, float *x) {
    const uint8_t *sc = y, *qs = y + 16;
    float d = from_fp16(get16(y + 80)), mn = from_fp16(get16(y + 82));
    for (int j = 0; j < QKK; ++j) {
        int sub = j / 16, l = (qs[(j / 128) * 32 + j % 32] >> (2 * ((j % 128) / 32))) & 3;
        x[j] = d * (float)(sc[sub] & 0xf) * (float)l - mn * (float)(sc[sub] >> 4);
    }
}
static void dq_q3_K(const uint8_t *y, float *x) {
    const uint8_t *hm = y, *qs = y + 32, *sc = y + 96;
    float d = from_fp16(get16(y + 108));
    for (int j = 0; j < QKK; ++j) {
        int sub = j / 16;
        int s = sub < 8 ? (sc[sub] & 0xf) : (sc[sub - 8] >> 4);
        s = (s | (((sc[8 + sub % 4] >> (2 * (sub / 4))) & 3) << 4)) - 32;
        int l = (qs[(j / 128) * 32 + j % 32] >> (2 * ((j % 128) / 32))) & 3;
        l -= ((hm[j % 32] >> (j / 32)) & 1) ? 0 : 4;
        x[j] = d * (float)s * (float)l;
    }
}
static void dq_q45_K(const uint8_t *y, float *x, int five) {
    const uint8_t *sc = y + 4, *qh = y + 16, *qs = y + (five ? 48 : 16);
    float d = from_fp16(get16(y)), dmin = from_fp16(get16(y + 2));
    for (int j = 0; j < QKK; ++j) {
        int sub = j / 32, s, m;
        if (sub < 4) { s = sc[sub] & 63; m = sc[sub + 4] & 63; }
        else { s = (sc[sub + 4] & 0xf) | ((sc[sub - 4] >> 6) << 4); m = (sc[sub + 4] >> 4) | ((sc[sub] >> 6) << 4); }
        int chunk = j / 64, half = (j % 64) / 32, l = qs[chunk * 32 + j % 32];
        l = half ? (l >> 4) : (l & 0xf);
        if (five) l |= ((qh[j % 32] >> (2 * chunk + half)) & 1) << 4;
        x[j] = d * (float)s * (float)l - dmin * (float)m;
    }
}
static void dq_q4_K(const uint8_t *y, float *x) { dq_q45_K(y, x, 0); }
static void dq_q5_K(const uint8_t *y, float *x) { dq_q45_K(y, x, 1); }
static void dq_q6_K(const uint8_t *y, float *x) {
    const uint8_t *ql = y, *qh = y + 128;
    const int8_t *sc = (const int8_t *)(y + 192);
    float d = from_fp16(get16(y + 208));
    for (int j = 0; j < QKK; ++j) {
        int h = j / 128, r = j % 128, quarter = r / 32, l = r % 32;
        int lo = ql[h * 64 + (quarter & 1) * 32 + l];
        lo = quarter >= 2 ? (lo >> 4) : (lo & 0xf);
        int hi = (qh[h * 32 + l] >> (2 * quarter)) & 3;
        x[j] = d * (float)sc[j / 16] * (float)((lo | (hi << 4)) - 32);
    }
}

/* ---- dispatch ---------------------------------------------------------------------------------- */

typedef void (*qfn)(const float *, uint8_t *);
typedef void (*dfn)(const uint8_t *, float *);
typedef void (*qrowfn)(const float *, const float *, int64_t, uint8_t *);
/* q: one block without importance; qw: one row with importance (NULL: the type ignores it, Q8_0) */
struct qt { int type, bs, ts; qfn q; dfn dq; qrowfn qw; };

/* ggml type ids */
static struct qt TYPES[] = {
    {2, 32, 18, q4_0_block, dq_q4_0, q4_0_row_w},      {3, 32, 20, q4_1_block, dq_q4_1, q4_1_row_w},
    {6, 32, 22, q5_0_block, dq_q5_0, q5_0_row_w},      {7, 32, 24, q5_1_block, dq_q5_1, q5_1_row_w},
    {8, 32, 34, q8_0_block, dq_q8_0, NULL},            {10, 256, 84, q2_K_block, dq_q2_K, q2_K_row_w},
    {11, 256, 110, q3_K_block, dq_q3_K, q3_K_row_w},   {12, 256, 144, q4_K_block, dq_q4_K, q4_K_row_w},
    {13, 256, 176, q5_K_block, dq_q5_K, q5_K_row_w},   {14, 256, 210, q6_K_block, dq_q6_K, q6_K_row_w},
};

static void pick_simd(void) {
#ifdef QTOOL_VEC_X86
    static int done = 0;
    if (done) return;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && !getenv("QTOOL_GGML_NO_AVX2")) {
        for (unsigned i = 0; i < sizeof TYPES / sizeof TYPES[0]; ++i) {
            if (TYPES[i].type == 10) TYPES[i].q = q2_K_block_avx2;
            if (TYPES[i].type == 12) TYPES[i].q = q4_K_block_avx2;
            if (TYPES[i].type == 13) TYPES[i].q = q5_K_block_avx2;
            if (TYPES[i].type == 14) TYPES[i].q = q6_K_block_avx2;
        }
        static const qrowfn qw_avx2[] = {q4_0_row_w_avx2, q4_1_row_w_avx2, q5_0_row_w_avx2, q5_1_row_w_avx2, NULL,
                                         q2_K_row_w_avx2, q3_K_row_w_avx2, q4_K_row_w_avx2, q5_K_row_w_avx2,
                                         q6_K_row_w_avx2};
        for (unsigned i = 0; i < sizeof TYPES / sizeof TYPES[0]; ++i) TYPES[i].qw = qw_avx2[i];
    }
    done = 1;
#endif
}

int qtool_ggml_simd(void) {
    pick_simd();
#ifdef QTOOL_VEC_X86
    return TYPES[9].q == q6_K_block_avx2;
#else
    return 0;
#endif
}

static const struct qt *find(int type) {
    pick_simd();
    for (unsigned i = 0; i < sizeof TYPES / sizeof TYPES[0]; ++i)
        if (TYPES[i].type == type) return &TYPES[i];
    return 0;
}

/* 2: qtool_ggml_quantize_w (an importance matrix) */
int qtool_ggml_abi_version(void) { return 2; }

int qtool_ggml_supports(int type) { return find(type) != 0; }

static int row_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!(fabsf(x[i]) <= 3.4028234663852886e38f)) return 0;
    return 1;
}

/* Quantize rows [0, nrows) of x (row-major, ncols floats each) into y (ncols/bs*ts bytes per row),
 * with the importance matrix qw (ncols floats: one per column, llama.cpp's quant_weights) or without
 * (qw NULL; Q8_0 ignores one, as llama.cpp does).
 * Returns -2 for an unknown type or a row length that is not whole blocks, the index of the first row
 * holding NaN/inf (that row and the ones after it are left unwritten), or nrows when all were done.
 * If err is non-NULL, err[0] += sum x^2 and err[1] += sum (x - dequantized)^2 (double) over the done rows. */
int64_t qtool_ggml_quantize_w(int type, const float *x, int64_t nrows, int64_t ncols, const float *qw, uint8_t *y,
                              double *err) {
    const struct qt *t = find(type);
    if (!t || ncols % t->bs) return -2;
    if (!t->qw) qw = NULL;
    int64_t nb = ncols / t->bs;
    float buf[QKK];
    double sig = 0.0, noise = 0.0;
    for (int64_t r = 0; r < nrows; ++r) {
        const float *xr = x + r * ncols;
        if (!row_finite(xr, ncols)) {
            if (err) { err[0] += sig; err[1] += noise; }
            return r;
        }
        uint8_t *yr = y + r * nb * t->ts;
        if (qw) t->qw(xr, qw, ncols, yr);       /* a whole row: the legacy types' weights need its mean x^2 */
        if (!qw || err) {
            for (int64_t b = 0; b < nb; ++b) {
                const float *xb = xr + b * t->bs;
                uint8_t *yb = yr + b * t->ts;
                if (!qw) t->q(xb, yb);
                if (err) {
                    t->dq(yb, buf);
                    for (int i = 0; i < t->bs; ++i) {
                        double v = xb[i], e = v - (double)buf[i];
                        sig += v * v;
                        noise += e * e;
                    }
                }
            }
        }
    }
    if (err) { err[0] += sig; err[1] += noise; }
    return nrows;
}

/* qtool_ggml_quantize_w without an importance matrix (ABI 1's entry) */
int64_t qtool_ggml_quantize(int type, const float *x, int64_t nrows, int64_t ncols, uint8_t *y, double *err) {
    return qtool_ggml_quantize_w(type, x, nrows, ncols, NULL, y, err);
}

/* Dequantize n blocks of `type` from y into x (n * bs floats). Returns 0, or -2 for an unknown type. */
int qtool_ggml_dequantize(int type, const uint8_t *y, int64_t nblocks, float *x) {
    const struct qt *t = find(type);
    if (!t) return -2;
    for (int64_t b = 0; b < nblocks; ++b) t->dq(y + b * t->ts, x + b * t->bs);
    return 0;
}

#ifdef QTOOL_PYTHON_MODULE
static struct PyModuleDef qtool_ggml_module = {PyModuleDef_HEAD_INIT, "_ggml_blocks", 0, -1, 0};
PyMODINIT_FUNC PyInit__ggml_blocks(void) { return PyModule_Create(&qtool_ggml_module); }
#endif
