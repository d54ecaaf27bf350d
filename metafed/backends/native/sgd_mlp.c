/* Local SGD of many clients' small ReLU MLPs, one client at a time, in cache.
 *
 * Why: the vectorized backend steps a chunk of C clients together with batched matmuls, so
 * every local step streams all C clients' weights through memory (W1 at C = 1000: 57 MB,
 * more than the last-level cache) for a few hundred FLOPs per weight. Here each thread takes
 * one client, copies its weights into a private buffer (W1: 57 KB, in L2) and runs all of
 * its local steps there before writing them back, so the weights cross memory twice per
 * round instead of several times per step. The maths is that of the programs' own steps
 * (masked mean cross-entropy, ReLU) in float32; only the summation order differs. A step is
 * one of the kinds in client_step, all built from one SGD pass with an optional proximal pull
 *   W <- (1 - lr mu) W + lr mu A - lr dL/dW    (FedProx; mu = 0: FedAvg):
 * plain SGD, a first-order meta step (FOMAML, Per-FedAvg FO), or pFedMe's Moreau step.
 *
 * Layouts (weights arrive in torch's [out, in] layout and leave in it):
 *  - layer 0 is kept transposed, [in][pad(out)]: its forward pass and its weight update are
 *    then rank-1 updates along contiguous rows of `out`, and the first layer needs no input
 *    gradient;
 *  - later layers keep [out][pad(in)]: their input gradient is a sum of rows, and their
 *    forward pass needs one horizontal sum per (sample, unit).
 * pad(n) rounds n up to a multiple of VL; padded columns hold zeros throughout (they are
 * multiplied by zero activations or gradients and never updated away from zero).
 *
 * Built at first use by metafed/backends/native/__init__.py with the system C compiler;
 * GCC vector extensions map VL-float vectors onto AVX-512, AVX2 or SSE as the CPU has. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
#define ROWS_MAX 12 /* batch rows held in registers at once (see BY_ROWS) */

static inline int64_t pad(int64_t n) { return (n + VL - 1) / VL * VL; }
static inline vf splat(float a) { return (vf){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* 0 where key <= 0, else v: ReLU and its backward as torch has them (a NaN key keeps v, so
 * NaN propagates to the loss and the update, where the server rejects it); C has no vector ?: */
static inline vf where_positive(vf key, vf v) { return (vf)((vi)v & ~(key <= splat(0.0f))); }
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
static inline float hsum(vf v) { /* halving: 16 -> 8 -> 4 lanes, then scalars */
    vf8 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    lo += hi;
    vf4 a, b;
    memcpy(&a, &lo, sizeof a);
    memcpy(&b, (const char *)&lo + sizeof a, sizeof b);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

/* what a local step is (client_step) */
enum { KIND_SGD = 0, KIND_META = 1, KIND_MOREAU = 2, KIND_MOREAU_SOLVE = 3 };

typedef struct {
    int64_t n_clients, n_layers, batch, max_steps, n_max;
    int64_t kind;        /* KIND_SGD, KIND_META, KIND_MOREAU or KIND_MOREAU_SOLVE (see client_step) */
    int64_t slots;       /* batches per step: 2 for a first-order meta step (support, query), else 1 */
    int64_t inner_steps; /* meta step: SGD steps on the support batch; Moreau: gradient steps of the solve */
    float outer_lr;      /* meta step: the query gradient's step on w; Moreau: w's step towards theta */
    float **pw, **pb;    /* KIND_MOREAU: the personal models theta, [C, out, in] / [C, out], updated in place */
    float *flag;         /* KIND_MOREAU: [C], 1 where a solve ever raised its own objective, else 0 */
    const int64_t *dims; /* [n_layers + 1]: in, hidden..., classes */
    float **w;           /* per layer: [C, out, in], updated in place */
    float **b;           /* per layer: [C, out], updated in place */
    float **anchor_w;    /* per layer, in the kernel's layout (see above); NULL when pull == 0 */
    float **anchor_b;    /* per layer [pad(out)] */
    const float *x;      /* [C, n_max, dims[0]] */
    const int64_t *y;    /* [C, n_max] */
    const int64_t *idx;  /* [C, max_steps, slots, batch]: sample index, -1 = padding */
    const int64_t *steps;/* [C]: active local steps */
    float lr, pull;
    float *loss;         /* [C]: sum of the per-step mean losses */
    int64_t next;        /* next client to take (atomic) */
    int failed;
} job_t;

typedef struct {
    float **w, **b;  /* the current client's layers, in the kernel's layout */
    float **tw, **tb; /* a meta step's temporary (adapted) model, same layout */
    float **h;       /* h[l]: [batch][pad(dims[l])] layer inputs; h[n_layers]: logits */
    float *dz, *dh;  /* [batch][pad(max dim)] */
} work_t;

static float *zalloc(int64_t n) {
    size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(float);
    bytes = (bytes + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

static void work_free(const job_t *job, work_t *s) {
    for (int64_t l = 0; l < job->n_layers; l++) {
        if (s->w) free(s->w[l]);
        if (s->b) free(s->b[l]);
        if (s->tw) free(s->tw[l]);
        if (s->tb) free(s->tb[l]);
    }
    for (int64_t l = 0; s->h && l <= job->n_layers; l++) free(s->h[l]);
    free(s->w); free(s->b); free(s->tw); free(s->tb); free(s->h); free(s->dz); free(s->dh);
}

static int work_alloc(const job_t *job, work_t *s) {
    const int64_t L = job->n_layers, B = job->batch, *d = job->dims;
    int64_t widest = 0;
    for (int64_t l = 0; l <= L; l++) widest = pad(d[l]) > widest ? pad(d[l]) : widest;
    const int meta = job->kind == KIND_META || job->kind == KIND_MOREAU;  /* a second model per thread */
    s->w = calloc(L, sizeof(float *));
    s->b = calloc(L, sizeof(float *));
    s->tw = calloc(L, sizeof(float *));
    s->tb = calloc(L, sizeof(float *));
    s->h = calloc(L + 1, sizeof(float *));
    s->dz = zalloc(B * widest);
    s->dh = zalloc(B * widest);
    if (!s->w || !s->b || !s->tw || !s->tb || !s->h || !s->dz || !s->dh) return -1;
    for (int64_t l = 0; l < L; l++) {
        const int64_t size = l == 0 ? d[0] * pad(d[1]) : d[l + 1] * pad(d[l]);
        s->w[l] = zalloc(size);
        s->b[l] = zalloc(pad(d[l + 1]));
        if (!s->w[l] || !s->b[l]) return -1;
        if (meta && (!(s->tw[l] = zalloc(size)) || !(s->tb[l] = zalloc(pad(d[l + 1]))))) return -1;
    }
    for (int64_t l = 0; l <= L; l++)
        if (!(s->h[l] = zalloc(B * pad(d[l])))) return -1;
    return 0;
}

/* torch layout [out, in] <-> the kernel's layout of layer l */
static void to_kernel(float *dst, const float *src, int64_t l, int64_t out, int64_t in) {
    /* padding zeroed on every load: a previous client's NaN (0 * NaN) must not leak into it */
    memset(dst, 0, (size_t)(l == 0 ? in * pad(out) : out * pad(in)) * sizeof(float));
    if (l == 0) {
        for (int64_t o = 0; o < out; o++)
            for (int64_t i = 0; i < in; i++) dst[i * pad(out) + o] = src[o * in + i];
    } else {
        for (int64_t o = 0; o < out; o++) memcpy(dst + o * pad(in), src + o * in, in * sizeof(float));
    }
}

static void from_kernel(float *dst, const float *src, int64_t l, int64_t out, int64_t in) {
    if (l == 0) {
        for (int64_t o = 0; o < out; o++)
            for (int64_t i = 0; i < in; i++) dst[o * in + i] = src[i * pad(out) + o];
    } else {
        for (int64_t o = 0; o < out; o++) memcpy(dst + o * in, src + o * pad(in), in * sizeof(float));
    }
}

/* Row blocks. Every inner kernel below takes R batch rows with R a compile-time constant
 * (BY_ROWS instantiates R = 1..ROWS_MAX), so its loops over rows unroll and the per-row
 * vectors stay in registers (32 zmm: ROWS_MAX x 2 accumulators + operands). A batch larger
 * than ROWS_MAX rows runs in several blocks. */
#define AI static inline __attribute__((always_inline))
#define BY_ROWS(fn, R, ...)                                      \
    switch (R) {                                                 \
        case 1: fn(1, __VA_ARGS__); break;                       \
        case 2: fn(2, __VA_ARGS__); break;                       \
        case 3: fn(3, __VA_ARGS__); break;                       \
        case 4: fn(4, __VA_ARGS__); break;                       \
        case 5: fn(5, __VA_ARGS__); break;                       \
        case 6: fn(6, __VA_ARGS__); break;                       \
        case 7: fn(7, __VA_ARGS__); break;                       \
        case 8: fn(8, __VA_ARGS__); break;                       \
        case 9: fn(9, __VA_ARGS__); break;                       \
        case 10: fn(10, __VA_ARGS__); break;                     \
        case 11: fn(11, __VA_ARGS__); break;                     \
        case 12: fn(12, __VA_ARGS__); break;                     \
        default: break;                                          \
    }

/* Layer 0 forward ([in][outp] layout): z[r][o] = bias[o] + sum_i h[r][i] wt[i][o], two
 * vectors of o at a time; wt is read once per row block. */
AI void forward_t_rows(const int R, const float *h, int64_t hs, const float *wt, const float *bias, float *z,
                       int64_t zs, int64_t in, int64_t outp) {
    int64_t o = 0;
    for (; o + 2 * VL <= outp; o += 2 * VL) {
        vf a0[ROWS_MAX], a1[ROWS_MAX];
        for (int r = 0; r < R; r++) { a0[r] = load(bias + o); a1[r] = load(bias + o + VL); }
        for (int64_t i = 0; i < in; i++) {
            const vf w0 = load(wt + i * outp + o), w1 = load(wt + i * outp + o + VL);
            for (int r = 0; r < R; r++) {
                const vf hv = splat(h[r * hs + i]);
                a0[r] += hv * w0;
                a1[r] += hv * w1;
            }
        }
        for (int r = 0; r < R; r++) { store(z + r * zs + o, a0[r]); store(z + r * zs + o + VL, a1[r]); }
    }
    for (; o < outp; o += VL) {
        vf a0[ROWS_MAX];
        for (int r = 0; r < R; r++) a0[r] = load(bias + o);
        for (int64_t i = 0; i < in; i++) {
            const vf w0 = load(wt + i * outp + o);
            for (int r = 0; r < R; r++) a0[r] += splat(h[r * hs + i]) * w0;
        }
        for (int r = 0; r < R; r++) store(z + r * zs + o, a0[r]);
    }
}

/* Layer 0 update ([in][outp] layout): wt[i] <- pull(base[i]) - lr sum_r h[r][i] dz[r], with the
 * block's scaled gradient rows -lr dz[r] held in registers while the weights stream past
 * once. base == wt updates in place; a meta step's inner update writes elsewhere.
 * `pulling`: apply the proximal pull (first row block only). */
AI void update_t_rows(const int R, float *wt, const float *base, const float *aw, const float *h, int64_t hs,
                      const float *dz, int64_t dzs, int64_t in, int64_t outp, float lr, float keep, float toward,
                      int pulling) {
    int64_t o = 0;
    for (; o + 2 * VL <= outp; o += 2 * VL) {
        vf d0[ROWS_MAX], d1[ROWS_MAX];
        for (int r = 0; r < R; r++) {
            d0[r] = load(dz + r * dzs + o) * splat(-lr);
            d1[r] = load(dz + r * dzs + o + VL) * splat(-lr);
        }
        for (int64_t i = 0; i < in; i++) {
            float *wi = wt + i * outp + o;
            vf w0 = load(base + i * outp + o), w1 = load(base + i * outp + o + VL);
            if (pulling) {
                w0 = w0 * splat(keep) + load(aw + i * outp + o) * splat(toward);
                w1 = w1 * splat(keep) + load(aw + i * outp + o + VL) * splat(toward);
            }
            for (int r = 0; r < R; r++) {
                const vf hv = splat(h[r * hs + i]);
                w0 += hv * d0[r];
                w1 += hv * d1[r];
            }
            store(wi, w0);
            store(wi + VL, w1);
        }
    }
    for (; o < outp; o += VL) {
        vf d0[ROWS_MAX];
        for (int r = 0; r < R; r++) d0[r] = load(dz + r * dzs + o) * splat(-lr);
        for (int64_t i = 0; i < in; i++) {
            float *wi = wt + i * outp + o;
            vf w0 = load(base + i * outp + o);
            if (pulling) w0 = w0 * splat(keep) + load(aw + i * outp + o) * splat(toward);
            for (int r = 0; r < R; r++) w0 += splat(h[r * hs + i]) * d0[r];
            store(wi, w0);
        }
    }
}

/* Later layers' forward ([out][inp] layout): z[r][o] = bias[o] + <h[r], w[o]>; each w[o]
 * vector is loaded once per row block. */
AI void forward_n_rows(const int R, const float *h, int64_t hs, const float *w, const float *bias, float *z,
                       int64_t zs, int64_t inp, int64_t out) {
    for (int64_t o = 0; o < out; o++) {
        vf acc[ROWS_MAX];
        for (int r = 0; r < R; r++) acc[r] = splat(0.0f);
        for (int64_t i = 0; i < inp; i += VL) {
            const vf wv = load(w + o * inp + i);
            for (int r = 0; r < R; r++) acc[r] += load(h + r * hs + i) * wv;
        }
        for (int r = 0; r < R; r++) z[r * zs + o] = bias[o] + hsum(acc[r]);
    }
    for (int r = 0; r < R; r++)
        for (int64_t o = out; o < pad(out); o++) z[r * zs + o] = 0.0f;
}

/* Later layers' input gradient through the old weights, then ReLU's backward:
 * dh[r] = (sum_o dz[r][o] w[o]) where h[r] > 0, else 0. */
AI void backward_n_rows(const int R, const float *dz, int64_t dzs, const float *w, const float *h, int64_t hs,
                        float *dh, int64_t inp, int64_t out) {
    for (int64_t i = 0; i < inp; i += VL) {
        vf acc[ROWS_MAX];
        for (int r = 0; r < R; r++) acc[r] = splat(0.0f);
        for (int64_t o = 0; o < out; o++) {
            const vf wv = load(w + o * inp + i);
            for (int r = 0; r < R; r++) acc[r] += splat(dz[r * dzs + o]) * wv;
        }
        for (int r = 0; r < R; r++) store(dh + r * hs + i, where_positive(load(h + r * hs + i), acc[r]));
    }
}

/* Later layers' update: w[o] <- pull(base[o]) - lr sum_r dz[r][o] h[r]. */
AI void update_n_rows(const int R, float *w, const float *base, const float *aw, const float *h, int64_t hs,
                      const float *dz, int64_t dzs, int64_t inp, int64_t out, float lr, float keep, float toward,
                      int pulling) {
    for (int64_t o = 0; o < out; o++) {
        vf c[ROWS_MAX];
        for (int r = 0; r < R; r++) c[r] = splat(-lr * dz[r * dzs + o]);
        for (int64_t i = 0; i < inp; i += VL) {
            vf acc = load(base + o * inp + i);
            if (pulling) acc = acc * splat(keep) + load(aw + o * inp + i) * splat(toward);
            for (int r = 0; r < R; r++) acc += c[r] * load(h + r * hs + i);
            store(w + o * inp + i, acc);
        }
    }
}

/* Bias update: b <- pull(base) - lr sum_r dz[r]. */
AI void update_bias_rows(const int R, float *bias, const float *base, const float *ab, const float *dz, int64_t dzs,
                         int64_t outp, float lr, float keep, float toward, int pulling) {
    for (int64_t o = 0; o < outp; o += VL) {
        vf acc = load(base + o);
        if (pulling) acc = acc * splat(keep) + load(ab + o) * splat(toward);
        vf g = splat(0.0f);
        for (int r = 0; r < R; r++) g += load(dz + r * dzs + o);
        store(bias + o, acc - splat(lr) * g);
    }
}

/* The proximal pull, keep * w + toward * a with keep = 1 - lr mu, toward = lr mu (a == NULL: w). */
static inline vf pulled(vf w, const float *a, float keep, float toward) {
    return a ? w * splat(keep) + load(a) * splat(toward) : w;
}

static inline void relu_rows(float *z, int64_t zs, int64_t rows, int64_t np) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < np; i += VL) {
            const vf v = load(z + r * zs + i);
            store(z + r * zs + i, where_positive(v, v));
        }
}

/* Masked mean cross-entropy of `rows` real samples (n = max(rows, 1)); writes
 * dL/dlogits = (softmax - onehot) / n into dz and returns the mean loss. */
static float cross_entropy(const float *z, int64_t zs, const int64_t *y, int64_t rows, int64_t k, float *dz,
                           int64_t dzs) {
    const float n = rows > 0 ? (float)rows : 1.0f;
    double total = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * zs;
        float *dr = dz + r * dzs;
        float m = zr[0];
        for (int64_t j = 1; j < k; j++) m = zr[j] > m ? zr[j] : m;
        float s = 0.0f;
        for (int64_t j = 0; j < k; j++) s += expf(zr[j] - m);
        const float lse = m + logf(s);
        total += lse - zr[y[r]];
        for (int64_t j = 0; j < k; j++) dr[j] = expf(zr[j] - lse) / n;
        dr[y[r]] -= 1.0f / n;
        for (int64_t j = k; j < pad(k); j++) dr[j] = 0.0f;
    }
    return (float)(total / n);
}

/* Which weights one SGD pass reads and writes, per layer (kernel layouts): the forward and
 * backward pass go through `src`; the update writes dst <- pull(base) - lr grad. In place,
 * all three are the same; a meta step's inner update reads and keeps w but writes the
 * temporary model, and its outer update goes through the temporary model into w. */
typedef struct {
    float **src_w, **src_b, **base_w, **base_b, **dst_w, **dst_b;
    float **aw, **ab; /* the proximal pull's anchor (kernel layout), NULL: no pull */
    float mu;         /* the pull's strength */
} pass_t;

/* One SGD step on one batch (B sample indices, -1 = padding); returns its mean loss, taken
 * before the step. forward_only: the loss alone, nothing updated. */
static float sgd_pass(const job_t *job, work_t *s, int64_t c, const int64_t *sample, pass_t p, float lr,
                      int forward_only) {
    const int64_t L = job->n_layers, B = job->batch, *d = job->dims;
    const float keep = 1.0f - lr * p.mu, toward = lr * p.mu;
    const int pull = p.aw != NULL && p.mu != 0.0f;
    /* gather the real samples of this step into h[0] (padding rows carry no weight) */
    int64_t rows = 0, ys[B > 0 ? B : 1];
    const float *xc = job->x + c * job->n_max * d[0];
    for (int64_t j = 0; j < B; j++) {
        const int64_t k = sample[j];
        if (k < 0) continue;
        memcpy(s->h[0] + rows * pad(d[0]), xc + k * d[0], d[0] * sizeof(float));
        ys[rows++] = job->y[c * job->n_max + k];
    }
    /* forward: h[l + 1] = relu(layer_l(h[l])), the last layer's output (logits) unrectified */
    for (int64_t l = 0; l < L; l++) {
        const int64_t hs = pad(d[l]), zs = pad(d[l + 1]);
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS_MAX) {
            const int R = (int)(rows - r0 < ROWS_MAX ? rows - r0 : ROWS_MAX);
            const float *h = s->h[l] + r0 * hs;
            float *z = s->h[l + 1] + r0 * zs;
            if (l == 0) {
                BY_ROWS(forward_t_rows, R, h, hs, p.src_w[0], p.src_b[0], z, zs, d[0], zs);
            } else {
                BY_ROWS(forward_n_rows, R, h, hs, p.src_w[l], p.src_b[l], z, zs, hs, d[l + 1]);
            }
        }
        if (l < L - 1) relu_rows(s->h[l + 1], zs, rows, zs);
    }
    float *dz = s->dz, *dh = s->dh;
    const float loss = cross_entropy(s->h[L], pad(d[L]), ys, rows, d[L], dz, pad(d[L]));
    if (forward_only) return loss;
    /* backward, last layer first; dz: [rows][pad(out)], the gradient of this layer's output */
    for (int64_t l = L - 1; l >= 0; l--) {
        const int64_t inp = pad(d[l]), outp = pad(d[l + 1]), size = l == 0 ? d[0] * outp : d[l + 1] * inp;
        const float *h = s->h[l];
        const float *aw = pull ? p.aw[l] : NULL, *ab = pull ? p.ab[l] : NULL;
        float *w = p.dst_w[l], *bias = p.dst_b[l];
        if (l > 0)  /* before the update: the input gradient goes through the old weights */
            for (int64_t r0 = 0; r0 < rows; r0 += ROWS_MAX) {
                const int R = (int)(rows - r0 < ROWS_MAX ? rows - r0 : ROWS_MAX);
                BY_ROWS(backward_n_rows, R, dz + r0 * outp, outp, p.src_w[l], h + r0 * inp, inp, dh + r0 * inp, inp,
                        d[l + 1]);
            }
        if (rows == 0) {  /* no sample, no gradient: dst <- pull(base) */
            for (int64_t j = 0; j < size; j += VL)
                store(w + j, pulled(load(p.base_w[l] + j), aw ? aw + j : NULL, keep, toward));
            for (int64_t o = 0; o < outp; o += VL)
                store(bias + o, pulled(load(p.base_b[l] + o), ab ? ab + o : NULL, keep, toward));
        }
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS_MAX) {
            /* the first row block starts from base (and pulls), later ones accumulate into dst */
            const int R = (int)(rows - r0 < ROWS_MAX ? rows - r0 : ROWS_MAX), first = pull && r0 == 0;
            const float *hr = h + r0 * inp, *dzr = dz + r0 * outp;
            const float *from_w = r0 == 0 ? p.base_w[l] : w, *from_b = r0 == 0 ? p.base_b[l] : bias;
            if (l == 0) {
                BY_ROWS(update_t_rows, R, w, from_w, aw, hr, inp, dzr, outp, d[0], outp, lr, keep, toward, first);
            } else {
                BY_ROWS(update_n_rows, R, w, from_w, aw, hr, inp, dzr, outp, inp, d[l + 1], lr, keep, toward, first);
            }
            BY_ROWS(update_bias_rows, R, bias, from_b, ab, dzr, outp, outp, lr, keep, toward, first);
        }
        if (l > 0) { float *t = dz; dz = dh; dh = t; }
    }
    return loss;
}

/* lam/2 ||a - b||^2 over all layers (padding is zero in both) */
static double prox_term(const job_t *job, float **aw, float **ab, float **bw, float **bb, float lam) {
    const int64_t *d = job->dims;
    double total = 0.0;
    for (int64_t l = 0; l < job->n_layers; l++) {
        const int64_t size = l == 0 ? d[0] * pad(d[1]) : d[l + 1] * pad(d[l]);
        for (int64_t j = 0; j < size; j++) total += (double)(aw[l][j] - bw[l][j]) * (aw[l][j] - bw[l][j]);
        for (int64_t o = 0; o < d[l + 1]; o++) total += (double)(ab[l][o] - bb[l][o]) * (ab[l][o] - bb[l][o]);
    }
    return 0.5 * lam * total;
}

/* One local step of client c on its batch(es):
 * - KIND_SGD: w <- pull(w) - lr grad(loss(w)) (pull towards the global model: FedProx).
 * - KIND_META, a first-order meta step (support batch, query batch: FOMAML, Per-FedAvg FO):
 *   temp <- w; inner_steps times temp <- temp - lr grad(loss(temp; support));
 *   w <- w - outer_lr grad(loss(temp; query)); the reported loss is the query loss.
 * - KIND_MOREAU, pFedMe's step: theta (the personal model, warm) takes inner_steps gradient
 *   steps on loss(theta) + lam/2 ||theta - w||^2 at lr (lam = job->pull), then
 *   w <- w - outer_lr lam (w - theta); reports loss(theta) and flags a solve that raised
 *   its own objective.
 * - KIND_MOREAU_SOLVE, pFedMe's personalization: the same solve on w anchored at the global
 *   model; reports loss(w) after it. */
static float client_step(const job_t *job, work_t *s, int64_t c, const int64_t *sample) {
    pass_t own = {s->w, s->b, s->w, s->b, s->w, s->b, job->anchor_w, job->anchor_b, job->pull};
    if (job->kind == KIND_SGD) return sgd_pass(job, s, c, sample, own, job->lr, 0);
    if (job->kind == KIND_MOREAU_SOLVE) {
        for (int64_t k = 0; k < job->inner_steps; k++) sgd_pass(job, s, c, sample, own, job->lr, 0);
        return sgd_pass(job, s, c, sample, own, job->lr, 1);
    }
    if (job->kind == KIND_MOREAU) {
        const float lam = job->pull;
        pass_t theta = {s->tw, s->tb, s->tw, s->tb, s->tw, s->tb, s->w, s->b, lam};
        const double start = prox_term(job, s->tw, s->tb, s->w, s->b, lam);
        float first = 0.0f;
        for (int64_t k = 0; k < job->inner_steps; k++) {
            const float value = sgd_pass(job, s, c, sample, theta, job->lr, 0);
            if (k == 0) first = value;
        }
        const float value = sgd_pass(job, s, c, sample, theta, job->lr, 1);
        if (job->inner_steps == 0) first = value;
        if (value + prox_term(job, s->tw, s->tb, s->w, s->b, lam) > first + start) job->flag[c] = 1.0f;
        const float keep = 1.0f - job->outer_lr * lam, toward = job->outer_lr * lam;
        for (int64_t l = 0; l < job->n_layers; l++) {  /* w <- (1 - lr lam) w + lr lam theta */
            const int64_t *d = job->dims, size = l == 0 ? d[0] * pad(d[1]) : d[l + 1] * pad(d[l]);
            for (int64_t j = 0; j < size; j += VL) store(s->w[l] + j, pulled(load(s->w[l] + j), s->tw[l] + j, keep, toward));
            for (int64_t o = 0; o < pad(d[l + 1]); o += VL)
                store(s->b[l] + o, pulled(load(s->b[l] + o), s->tb[l] + o, keep, toward));
        }
        return value;
    }
    pass_t inner = {s->w, s->b, s->w, s->b, s->tw, s->tb, NULL, NULL, 0.0f};  /* the first inner step writes temp */
    for (int64_t k = 0; k < job->inner_steps; k++) {
        sgd_pass(job, s, c, sample, inner, job->lr, 0);
        inner = (pass_t){s->tw, s->tb, s->tw, s->tb, s->tw, s->tb, NULL, NULL, 0.0f};
    }
    if (job->inner_steps == 0) inner = (pass_t){s->w, s->b, s->w, s->b, s->w, s->b, NULL, NULL, 0.0f};
    pass_t outer = {inner.src_w, inner.src_b, s->w, s->b, s->w, s->b, NULL, NULL, 0.0f};
    return sgd_pass(job, s, c, sample + job->batch, outer, job->outer_lr, 0);
}

static void train_client(const job_t *job, work_t *s, int64_t c) {
    const int64_t L = job->n_layers, *d = job->dims;
    for (int64_t l = 0; l < L; l++) {
        to_kernel(s->w[l], job->w[l] + c * d[l + 1] * d[l], l, d[l + 1], d[l]);
        memset(s->b[l], 0, (size_t)pad(d[l + 1]) * sizeof(float));
        memcpy(s->b[l], job->b[l] + c * d[l + 1], d[l + 1] * sizeof(float));
    }
    for (int64_t l = 0; job->kind == KIND_MOREAU && l < L; l++) {  /* theta, the warm start */
        to_kernel(s->tw[l], job->pw[l] + c * d[l + 1] * d[l], l, d[l + 1], d[l]);
        memset(s->tb[l], 0, (size_t)pad(d[l + 1]) * sizeof(float));
        memcpy(s->tb[l], job->pb[l] + c * d[l + 1], d[l + 1] * sizeof(float));
    }
    double total = 0.0;
    for (int64_t t = 0; t < job->steps[c]; t++)
        total += client_step(job, s, c, job->idx + (c * job->max_steps + t) * job->slots * job->batch);
    job->loss[c] = (float)total;
    for (int64_t l = 0; l < L; l++) {
        from_kernel(job->w[l] + c * d[l + 1] * d[l], s->w[l], l, d[l + 1], d[l]);
        memcpy(job->b[l] + c * d[l + 1], s->b[l], d[l + 1] * sizeof(float));
        if (job->kind != KIND_MOREAU) continue;
        from_kernel(job->pw[l] + c * d[l + 1] * d[l], s->tw[l], l, d[l + 1], d[l]);
        memcpy(job->pb[l] + c * d[l + 1], s->tb[l], d[l + 1] * sizeof(float));
    }
}

static void *worker(void *arg) {
    job_t *job = arg;
    work_t s = {0};
    if (work_alloc(job, &s) != 0) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_SEQ_CST);
    } else {
        for (;;) {
            const int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
            if (c >= job->n_clients) break;
            train_client(job, &s, c);
        }
    }
    work_free(job, &s);
    return NULL;
}

/* Train n_clients clients in place; returns 0, or -1 when memory ran out (the weights of
 * the clients already trained are then updated: the caller discards them). See client_step
 * for the kinds: KIND_SGD (lr, pull towards anchor), KIND_META (idx holds 2 batches per
 * step; inner lr = lr, inner_steps, outer_lr), KIND_MOREAU (personal lr = lr, lam = pull,
 * inner_steps, outer_lr; pw/pb the personal models, flag [C]) and KIND_MOREAU_SOLVE (lr,
 * lam = pull towards anchor, inner_steps). */
int mf_sgd_mlp_train(int64_t kind, int64_t n_clients, int64_t n_layers, const int64_t *dims, float **w, float **b,
                     float **pw, float **pb, float **anchor_w, float **anchor_b, const float *x, const int64_t *y,
                     int64_t n_max, const int64_t *idx, int64_t max_steps, int64_t batch, const int64_t *steps,
                     float lr, float pull, int64_t inner_steps, float outer_lr, float *loss, float *flag,
                     int64_t n_threads) {
    job_t job = {.n_clients = n_clients, .n_layers = n_layers, .batch = batch, .max_steps = max_steps,
                 .n_max = n_max, .kind = kind, .slots = kind == KIND_META ? 2 : 1, .inner_steps = inner_steps,
                 .outer_lr = outer_lr, .pw = pw, .pb = pb, .flag = flag, .dims = dims, .w = w, .b = b, .x = x,
                 .y = y, .idx = idx, .steps = steps, .lr = lr, .pull = pull, .loss = loss};
    int status = 0;
    float **aw = NULL, **ab = NULL;
    if (pull != 0.0f && (kind == KIND_SGD || kind == KIND_MOREAU_SOLVE)) { /* the global anchor, kernel layout */
        aw = calloc(n_layers, sizeof(float *));
        ab = calloc(n_layers, sizeof(float *));
        if (!aw || !ab) { free(aw); free(ab); return -1; }
        for (int64_t l = 0; l < n_layers; l++) {
            aw[l] = l == 0 ? zalloc(dims[0] * pad(dims[1])) : zalloc(dims[l + 1] * pad(dims[l]));
            ab[l] = zalloc(pad(dims[l + 1]));
            if (!aw[l] || !ab[l]) { status = -1; continue; }
            to_kernel(aw[l], anchor_w[l], l, dims[l + 1], dims[l]);
            memcpy(ab[l], anchor_b[l], dims[l + 1] * sizeof(float));
        }
        job.anchor_w = aw;
        job.anchor_b = ab;
    }
    if (status == 0) {
        int64_t extra = n_threads - 1 < n_clients - 1 ? n_threads - 1 : n_clients - 1;
        if (extra < 0) extra = 0;
        pthread_t threads[extra > 0 ? extra : 1];
        int64_t started = 0;
        for (; started < extra; started++)
            if (pthread_create(&threads[started], NULL, worker, &job) != 0) break;
        worker(&job);
        for (int64_t t = 0; t < started; t++) pthread_join(threads[t], NULL);
        status = job.failed ? -1 : 0;
    }
    for (int64_t l = 0; aw && l < n_layers; l++) { free(aw[l]); free(ab[l]); }
    free(aw); free(ab);
    return status;
}
