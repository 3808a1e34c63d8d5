// Packed nested row-sparse (DRESS "banded" layout) linear and conv2d kernels.
//
// Layout: band b holds, for every row r, `width_b` consecutive (value, column) pairs at
// values[offset_b + r * width_b ...]; a density reads a prefix of bands, so switching
// density never copies.  The kernels accept any band list (offset, width), int16 or int32
// column indices, and any order of indices inside a band (ascending order is faster).
//
// Hot loop ("spmm"): Y[rows, N] = W_sparse @ X[cols, N] where every column index c
// addresses a contiguous, vector-aligned N-vector of X at X + off(c).  A register tile of
// R rows x NV vectors of N is held across the whole nonzero loop, so every nonzero costs
// one broadcast plus NV vector loads and FMAs; the fused scale/shift/ReLU is applied in
// registers and whole vectors are stored when the output layout allows.
//   * linear, batch >= 2: X = x^T padded to [in, ldx], off(c) = c * ldx;
//   * conv: X = "tap planes" of the zero-padded input (one per channel, kernel column and
//     row phase of the stride, rows padded to whole vectors), so each tap's input is one
//     contiguous aligned run at off(c) = lut[c]; no im2col.  A stride-1 1x1 conv reads x
//     itself when its planes are whole tiles;
//   * linear, batch 1: rows in lockstep, scalar gathers (faster than vector gathers here).
//
// Portability: no -march flags.  On x86-64 each hot routine is compiled three times
// (AVX-512, AVX2+FMA, baseline) through GCC/Clang target attributes and picked once at
// run time with __builtin_cpu_supports (manual function multiversioning: the tile shape
// differs per ISA, which target_clones cannot express).  Elsewhere (aarch64/NEON) the
// same source builds the baseline variant only, vectorised through GCC vector types.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DRESS_X86 1
#else
#define DRESS_X86 0
#endif

#define DRESS_INLINE inline __attribute__((always_inline))

typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

struct Band {
  int64_t off;
  int64_t width;
};

// Everything a kernel range needs; built once per call, read-only in the workers.
struct Job {
  const float* vals = nullptr;
  const void* idx = nullptr;
  const Band* bands = nullptr;
  int nb = 0;
  int64_t rows = 0;
  const float* x = nullptr;     // prepared input of image 0
  int64_t x_img_stride = 0;     // floats between images of the prepared input
  const int32_t* lut = nullptr; // column -> offset (conv); null: off(c) = c * ldx
  int64_t ldx = 0;
  int64_t n = 0;                // virtual output columns per image (linear: batch)
  int64_t images = 1;
  float* out = nullptr;
  bool batch_major = false;     // linear: out[n * rows + r]; conv: out[img][r][oh][ow]
  int64_t vw = 0, oh = 0, ow = 0;
  const float* scale = nullptr;
  const float* shift = nullptr;
  bool relu = false;
};

using RangeFn = void (*)(const Job&, int64_t, int64_t);

struct Plan {
  RangeFn fn;
  int rows_per_tile;
  int cols_per_tile;  // floats of N covered by one tile
};

template <class V>
DRESS_INLINE V loadu(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

DRESS_INLINE float epilogue(const Job& j, int64_t r, float a) {
  if (j.scale) a *= j.scale[r];
  if (j.shift) a += j.shift[r];
  return (j.relu && a < 0.f) ? 0.f : a;  // NaN passes through, as torch.relu
}

// Copies a finished tile (tmp is [nr][width], epilogue applied) to an output layout that
// cannot take whole vectors: linear's batch-major [B, rows] or a conv plane whose virtual
// width exceeds the real one.
inline void scatter_tile(const Job& j, int64_t img, int64_t r0, int nr, int64_t n0, int width,
                         const float* tmp) {
  const int64_t n1 = std::min<int64_t>(n0 + width, j.n);
  if (j.batch_major) {
    for (int64_t n = n0; n < n1; ++n) {
      float* o = j.out + n * j.rows + r0;
      for (int r = 0; r < nr; ++r) o[r] = tmp[r * width + (n - n0)];
    }
    return;
  }
  const int64_t plane = j.oh * j.ow;
  for (int r = 0; r < nr; ++r) {
    float* o = j.out + (img * j.rows + r0 + r) * plane;
    const float* t = tmp + r * width - n0;
    for (int64_t y = n0 / j.vw; y * j.vw < n1; ++y) {
      const int64_t a = std::max(n0, y * j.vw), b = std::min(n1, y * j.vw + j.ow);
      if (a < b) std::copy(t + a, t + b, o + y * j.ow + (a - y * j.vw));
    }
  }
}

// Rows r0..r0+R of W times the NV*VL columns of image `img` starting at n0 (X points at
// them), with the epilogue applied in registers and stored straight to the output when the
// tile maps to whole contiguous vectors there.
template <class V, int R, int NV, class I, bool LUT>
DRESS_INLINE void tile(const Job& j, int64_t img, int64_t r0, int64_t n0, const float* X,
                       float* tmp) {
  constexpr int VL = int(sizeof(V) / sizeof(float));
  const I* idx = static_cast<const I*>(j.idx);
  const int32_t* lut = j.lut;
  const int64_t ldx = j.ldx;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < NV; ++q) acc[r][q] = V{};
  for (int b = 0; b < j.nb; ++b) {
    const int64_t w = j.bands[b].width;
    const float* vp = j.vals + j.bands[b].off + r0 * w;
    const I* ip = idx + j.bands[b].off + r0 * w;
    for (int64_t k = 0; k < w; ++k) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const int64_t c = ip[r * w + k];
        const float* xp = X + (LUT ? int64_t(lut[c]) : c * ldx);
        const float v = vp[r * w + k];
#pragma GCC unroll 16
        for (int q = 0; q < NV; ++q) acc[r][q] += v * loadu<V>(xp + q * VL);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float s = j.scale ? j.scale[r0 + r] : 1.f, t = j.shift ? j.shift[r0 + r] : 0.f;
#pragma GCC unroll 16
    for (int q = 0; q < NV; ++q) {
      V a = acc[r][q] * s + t;
      if (j.relu) a = a < V{} ? V{} : a;
      acc[r][q] = a;
    }
  }
  if (!j.batch_major && j.vw == j.ow && n0 + NV * VL <= j.n) {
    const int64_t plane = j.oh * j.ow;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int q = 0; q < NV; ++q)
        std::memcpy(j.out + (img * j.rows + r0 + r) * plane + n0 + q * VL, &acc[r][q], sizeof(V));
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < NV; ++q) std::memcpy(tmp + (r * NV + q) * VL, &acc[r][q], sizeof(V));
  scatter_tile(j, img, r0, R, n0, NV * VL, tmp);
}

// Work items t in [t0, t1) enumerate (image, row block, column chunk), chunk fastest so a
// row block's weights stay in L1 while its columns are swept.
template <class V, int R, int NV, class I, bool LUT>
DRESS_INLINE void spmm_range(const Job& j, int64_t t0, int64_t t1) {
  constexpr int CH = NV * int(sizeof(V) / sizeof(float));
  alignas(64) float tmp[R * CH];
  const int64_t nrb = (j.rows + R - 1) / R, nnc = (j.n + CH - 1) / CH;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t img = t / (nrb * nnc), rem = t % (nrb * nnc);
    const int64_t r0 = (rem / nnc) * R, n0 = (rem % nnc) * CH;
    const float* X = j.x + img * j.x_img_stride + n0;
    if (r0 + R <= j.rows) {
      tile<V, R, NV, I, LUT>(j, img, r0, n0, X, tmp);
    } else {
      for (int64_t r = r0; r < j.rows; ++r) tile<V, 1, NV, I, LUT>(j, img, r, n0, X, tmp);
    }
  }
}

// Batch-1 linear: R rows advance in lockstep (2 chains each) so the three loads per nonzero
// (index, value, x[index]) of different rows overlap; this beat AVX-512/AVX2 gathers here.
template <class I, int R>
DRESS_INLINE void dot_tile(const Job& j, int64_t r0) {
  const I* idx = static_cast<const I*>(j.idx);
  const float* x = j.x;
  float a0[R] = {}, a1[R] = {};
  for (int b = 0; b < j.nb; ++b) {
    const int64_t w = j.bands[b].width;
    const float* vp = j.vals + j.bands[b].off + r0 * w;
    const I* ip = idx + j.bands[b].off + r0 * w;
    int64_t k = 0;
    for (; k + 2 <= w; k += 2) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        a0[r] += vp[r * w + k] * x[ip[r * w + k]];
        a1[r] += vp[r * w + k + 1] * x[ip[r * w + k + 1]];
      }
    }
    if (k < w) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a0[r] += vp[r * w + k] * x[ip[r * w + k]];
    }
  }
  for (int r = 0; r < R; ++r) j.out[r0 + r] = epilogue(j, r0 + r, a0[r] + a1[r]);
}

constexpr int kDotRows = 4;

// Work item t = rows [t * kDotRows, ...).
template <class I>
DRESS_INLINE void dot_range(const Job& j, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t * kDotRows;
    if (r0 + kDotRows <= j.rows)
      dot_tile<I, kDotRows>(j, r0);
    else
      for (int64_t r = r0; r < j.rows; ++r) dot_tile<I, 1>(j, r);
  }
}

// ---------------------------------------------------------------- backward (training)
//
// With the forward's operand X ([cols, N]: x^T for linear, the tap planes for conv) and the output
// gradient G laid out like the forward's output tile ([rows, ldg], zeros in padding columns):
//   dvalues[e] = <G[r, :], X[c_e, :]>    (only at stored positions: a sampled dense-dense product)
//   dX[c_e, :] += values[e] * G[r, :]    (the transposed bands, scattered onto the operand's rows)
// over the columns [n0, n1) (whole vectors).  dX of the operand then maps back to the layer's input
// (a transpose for linear, Taps::unprep for conv).
struct GradJob {
  const float* vals = nullptr;
  const void* idx = nullptr;
  const Band* bands = nullptr;
  int nb = 0;
  int64_t rows = 0;
  const int32_t* lut = nullptr;  // column -> offset (conv); null: off(c) = c * ldx
  int64_t ldx = 0;
  const float* x = nullptr;      // forward operand; read only when dv is set
  float* dx = nullptr;           // its gradient, accumulated; null: not wanted
  const float* g = nullptr;      // output gradient [rows, ldg]
  int64_t ldg = 0;
  float* dv = nullptr;           // values' gradient, accumulated; null: not wanted
};

using GradFn = void (*)(const GradJob&, int64_t, int64_t);

// K stored entries of one row at a time over the columns [n0, n1): the row's output gradient is loaded
// once per vector for all K (loading it again for each entry doubled the memory traffic), and the K
// accumulators are independent chains.  Each entry still streams its whole run of X and dX, which the
// hardware prefetchers follow (short per-entry runs measured slower).
template <class V, int K, class I, bool DV, bool DX>
DRESS_INLINE void grad_entries(const GradJob& j, const float* g, int64_t e, int64_t n0, int64_t n1) {
  constexpr int VL = int(sizeof(V) / sizeof(float));
  const I* idx = static_cast<const I*>(j.idx);
  const float* xp[K];
  float* dp[K];
  float val[K];
  V acc[K];
  for (int k = 0; k < K; ++k) {
    const int64_t c = idx[e + k], base = j.lut ? int64_t(j.lut[c]) : c * j.ldx;
    xp[k] = j.x + base;
    dp[k] = j.dx + base;
    val[k] = j.vals[e + k];
    acc[k] = V{};
  }
  for (int64_t n = n0; n < n1; n += VL) {
    const V gv = loadu<V>(g + n);
    for (int k = 0; k < K; ++k) {
      if (DV) acc[k] += gv * loadu<V>(xp[k] + n);
      if (DX) {
        const V d = loadu<V>(dp[k] + n) + val[k] * gv;
        std::memcpy(dp[k] + n, &d, sizeof(V));
      }
    }
  }
  if (DV)
    for (int k = 0; k < K; ++k) {
      float sum = 0.f;
      for (int l = 0; l < VL; ++l) sum += acc[k][l];
      j.dv[e + k] += sum;
    }
}

template <class V, class I, bool DV, bool DX>
DRESS_INLINE void grad_rows(const GradJob& j, int64_t n0, int64_t n1) {
  constexpr int K = 4;
  for (int b = 0; b < j.nb; ++b) {
    const int64_t w = j.bands[b].width, off = j.bands[b].off;
    for (int64_t r = 0; r < j.rows; ++r) {
      const float* g = j.g + r * j.ldg;
      const int64_t e0 = off + r * w, e1 = e0 + w;
      int64_t e = e0;
      for (; e + K <= e1; e += K) grad_entries<V, K, I, DV, DX>(j, g, e, n0, n1);
      for (; e < e1; ++e) grad_entries<V, 1, I, DV, DX>(j, g, e, n0, n1);
    }
  }
}

template <class V, class I>
DRESS_INLINE void grad_range(const GradJob& j, int64_t n0, int64_t n1) {
  if (j.dv && j.dx) grad_rows<V, I, true, true>(j, n0, n1);
  else if (j.dv) grad_rows<V, I, true, false>(j, n0, n1);
  else if (j.dx) grad_rows<V, I, false, true>(j, n0, n1);
}

#define DRESS_DEFINE_ISA(SFX, ATTR)                                         \
  template <class V, int R, int NV, class I, bool LUT>                      \
  ATTR void spmm_##SFX(const Job& j, int64_t a, int64_t b) {                \
    spmm_range<V, R, NV, I, LUT>(j, a, b);                                  \
  }                                                                         \
  template <class I>                                                        \
  ATTR void dot_##SFX(const Job& j, int64_t a, int64_t b) {                 \
    dot_range<I>(j, a, b);                                                  \
  }                                                                         \
  template <class V, class I>                                               \
  ATTR void grad_##SFX(const GradJob& j, int64_t a, int64_t b) {            \
    grad_range<V, I>(j, a, b);                                              \
  }

DRESS_DEFINE_ISA(generic, )
#if DRESS_X86
DRESS_DEFINE_ISA(avx2, __attribute__((target("avx2,fma"))))
DRESS_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
#endif

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if DRESS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kGeneric;
}

const Isa g_best_isa = detect_isa();
std::atomic<int> g_isa{g_best_isa};

const char* isa_name(int isa) {
  return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "generic";
}

#define DRESS_PLAN(SFX, V, R, NV) \
  Plan { &spmm_##SFX<V, R, NV, I, LUT>, R, NV * int(sizeof(V) / sizeof(float)) }

// Tile shape for vectors of `vl` floats and n columns: as many accumulators as the register
// file holds (32 vector registers with AVX-512/NEON, 16 with AVX2/SSE) without padding n
// much past the next whole vector.
template <class I, bool LUT>
Plan spmm_plan(int isa, int vl, int64_t n) {
  const int64_t nv = (n + vl - 1) / vl;
#if DRESS_X86
  if (isa == kAvx512) {
    if (vl == 16) {
      if (nv <= 1) return DRESS_PLAN(avx512, v16f, 8, 1);
      if (nv <= 2) return DRESS_PLAN(avx512, v16f, 6, 2);
      return DRESS_PLAN(avx512, v16f, 4, 4);
    }
    if (vl == 8) {
      if (nv <= 1) return DRESS_PLAN(avx512, v8f, 8, 1);
      if (nv <= 2) return DRESS_PLAN(avx512, v8f, 6, 2);
      return DRESS_PLAN(avx512, v8f, 4, 4);
    }
    if (nv <= 1) return DRESS_PLAN(avx512, v4f, 8, 1);
    if (nv <= 2) return DRESS_PLAN(avx512, v4f, 6, 2);
    return DRESS_PLAN(avx512, v4f, 4, 4);
  }
  if (isa == kAvx2) {
    if (vl == 8) {
      if (nv <= 1) return DRESS_PLAN(avx2, v8f, 8, 1);
      if (nv <= 2) return DRESS_PLAN(avx2, v8f, 4, 2);
      return DRESS_PLAN(avx2, v8f, 3, 4);
    }
    if (nv <= 1) return DRESS_PLAN(avx2, v4f, 8, 1);
    if (nv <= 2) return DRESS_PLAN(avx2, v4f, 4, 2);
    return DRESS_PLAN(avx2, v4f, 3, 4);
  }
#endif
  (void)isa;
  if (nv <= 1) return DRESS_PLAN(generic, v4f, 8, 1);
#if defined(__aarch64__)
  if (nv <= 2) return DRESS_PLAN(generic, v4f, 6, 2);
  return DRESS_PLAN(generic, v4f, 4, 4);
#else
  if (nv <= 2) return DRESS_PLAN(generic, v4f, 4, 2);
  return DRESS_PLAN(generic, v4f, 2, 4);
#endif
}

int max_vl(int isa) { return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 4; }

// Vector length for rows of `width` floats: fewest vectors per row, then least padding.
int pick_vl(int isa, int64_t width) {
  int best = 4;
  for (int vl = 8; vl <= max_vl(isa); vl *= 2)
    if ((width + vl - 1) / vl < (width + best - 1) / best) best = vl;
  return best;
}

template <class I>
RangeFn dot_fn(int isa) {
#if DRESS_X86
  if (isa == kAvx512) return &dot_avx512<I>;
  if (isa == kAvx2) return &dot_avx2<I>;
#endif
  (void)isa;
  return &dot_generic<I>;
}

// The backward's routine for vectors of `vl` floats (pick_vl's choice for this ISA).
template <class I>
GradFn grad_fn_for(int isa, int vl) {
#if DRESS_X86
  if (isa == kAvx512) return vl == 16 ? &grad_avx512<v16f, I> : vl == 8 ? &grad_avx512<v8f, I> : &grad_avx512<v4f, I>;
  if (isa == kAvx2) return vl == 8 ? &grad_avx2<v8f, I> : &grad_avx2<v4f, I>;
#endif
  (void)isa;
  (void)vl;
  return &grad_generic<v4f, I>;
}

GradFn grad_fn(int isa, bool idx32, int vl) {
  return idx32 ? grad_fn_for<int32_t>(isa, vl) : grad_fn_for<int16_t>(isa, vl);
}

Plan choose_spmm(int isa, bool idx32, bool lut, int vl, int64_t n) {
  if (idx32) return lut ? spmm_plan<int32_t, true>(isa, vl, n) : spmm_plan<int32_t, false>(isa, vl, n);
  return lut ? spmm_plan<int16_t, true>(isa, vl, n) : spmm_plan<int16_t, false>(isa, vl, n);
}

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// ---------------------------------------------------------------- argument checking
//
// The Python wrappers check each tensor's dtype, device and contiguity and pass its data
// pointer and sizes (a numpy view costs ~0.7 us per tensor, a real share of a batch-1
// layer); sizes and band geometry are checked here.

[[noreturn]] void fail(const char* op, const std::string& msg) {
  throw py::value_error(std::string(op) + ": " + msg);
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

struct Packed {
  const float* vals = nullptr;
  const void* idx = nullptr;
  bool idx32 = false;
  std::vector<Band> bands;
  int64_t width_sum = 0;
};

// Bands must lie inside the `total`-element buffers for all `rows` rows.
Packed check_bands(const char* op, uintptr_t bands, int64_t nb, int64_t rows, int64_t total) {
  if (rows < 0) fail(op, "rows must be >= 0, got " + std::to_string(rows));
  Packed p;
  p.bands.resize(size_t(nb));
  const int64_t* bd = ptr<const int64_t>(bands);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = bd[2 * b], w = bd[2 * b + 1];
    if (off < 0 || w < 0 || off > total || (w > 0 && rows > (total - off) / w))
      fail(op, "band " + std::to_string(b) + " (offset " + std::to_string(off) + ", width " +
                   std::to_string(w) + ") for " + std::to_string(rows) +
                   " rows does not fit in the " + std::to_string(total) + "-element buffers");
    p.bands[size_t(b)] = {off, w};
    p.width_sum += w;
  }
  return p;
}

Packed check_packed(const char* op, uintptr_t values, int64_t nvals, uintptr_t indices,
                    int64_t nidx, bool idx32, uintptr_t bands, int64_t nb, int64_t rows,
                    int64_t cols) {
  if (nidx != nvals)
    fail(op, "indices has " + std::to_string(nidx) + " entries but values has " + std::to_string(nvals));
  Packed p = check_bands(op, bands, nb, rows, nvals);
  if (p.width_sum > cols)
    fail(op, "the bands hold " + std::to_string(p.width_sum) + " entries per row but the input has only " +
                 std::to_string(cols) + " columns per row (wrong input for this layer?)");
  p.vals = ptr<const float>(values);
  p.idx = ptr<const void>(indices);
  p.idx32 = idx32;
  return p;
}

template <class I>
int64_t first_bad_index(const Packed& p, int64_t rows, int64_t cols, int threads) {
  const I* idx = static_cast<const I*>(p.idx);
  for (const Band& b : p.bands) {
    const int64_t beg = b.off, end = b.off + rows * b.width;
    int64_t found = std::numeric_limits<int64_t>::max();
#pragma omp parallel for num_threads(threads) reduction(min : found) schedule(static)
    for (int64_t i = beg; i < end; ++i)
      if (idx[i] < 0 || int64_t(idx[i]) >= cols) found = std::min(found, i);
    if (found != std::numeric_limits<int64_t>::max()) return found;
  }
  return -1;
}

void check_index_range(const char* op, const Packed& p, int64_t rows, int64_t cols, int threads) {
  const int64_t bad = p.idx32 ? first_bad_index<int32_t>(p, rows, cols, threads)
                              : first_bad_index<int16_t>(p, rows, cols, threads);
  if (bad >= 0) {
    const int64_t v = p.idx32 ? static_cast<const int32_t*>(p.idx)[bad]
                              : static_cast<const int16_t*>(p.idx)[bad];
    fail(op, "indices[" + std::to_string(bad) + "] = " + std::to_string(v) +
                 " is outside the row's column range [0, " + std::to_string(cols) + ")");
  }
}

void check_threads(const char* op, int threads) {
  if (threads < 1) fail(op, "threads must be >= 1, got " + std::to_string(threads));
}

// A conv's arguments: geometry, the packed buffers against its C * kh * kw columns, and the output size.
Packed check_conv(const char* op, uintptr_t values, int64_t nvals, uintptr_t indices, int64_t nidx, bool idx32,
                  uintptr_t bands, int64_t nb, int64_t rows, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                  int64_t sh, int64_t sw, int64_t ph, int64_t pw, int threads, bool check_indices, int64_t out_h,
                  int64_t out_w) {
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0)
    fail(op, "kernel_size and stride must be >= 1 and padding >= 0");
  const int64_t cols = C * kh * kw;
  const Packed p = check_packed(op, values, nvals, indices, nidx, idx32, bands, nb, rows, cols);
  check_threads(op, threads);
  const int64_t OH = (H + 2 * ph - kh) / sh + 1, OW = (W + 2 * pw - kw) / sw + 1;
  if (H + 2 * ph < kh || W + 2 * pw < kw || OH != out_h || OW != out_w)
    fail(op, "output must be " + std::to_string(OH) + "x" + std::to_string(OW) + " for input " +
                 std::to_string(H) + "x" + std::to_string(W));
  // The tap planes (Taps) of one image must be addressable with 32-bit offsets, at the widest vector rows
  // any ISA pads them to, and its tile tail.
  const int64_t vw = round_up(OW, 16), plane = (OH + (kh - 1) / sh) * vw;
  if (C * kw * std::min(sh, kh) * plane + OH * vw + 1024 > std::numeric_limits<int32_t>::max())
    fail(op, "input too large for 32-bit tap offsets");
  if (check_indices) check_index_range(op, p, rows, cols, threads);
  return p;
}

Job base_job(const Packed& p, int64_t rows, uintptr_t scale, uintptr_t shift, bool relu,
             uintptr_t out) {
  Job j;
  j.vals = p.vals;
  j.idx = p.idx;
  j.bands = p.bands.data();
  j.nb = int(p.bands.size());
  j.rows = rows;
  j.out = ptr<float>(out);
  j.scale = ptr<const float>(scale);
  j.shift = ptr<const float>(shift);
  j.relu = relu;
  return j;
}

// ---------------------------------------------------------------- parallel driver

struct AlignedFree {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};

using Buffer = std::unique_ptr<float[], AlignedFree>;

// Cache-line aligned scratch for the prepared input: with vector-multiple offsets, every
// full-width load stays inside one cache line (misaligned loads measured ~35% slower).
Buffer aligned_floats(int64_t n) {
  return Buffer(static_cast<float*>(
      ::operator new[](size_t(std::max<int64_t>(n, 1)) * sizeof(float), std::align_val_t(64))));
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads worth waking for `work` (vector FMAs or scalar gathers): at least kGrain each, as
// a second thread on less made small layers slower, not faster.
constexpr int64_t kGrain = 8192;

int team_for(int threads, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, work / kGrain)));
}

// One parallel region of at most `team` threads.  Each thread first runs `prep(job, thread)`,
// which may point its own copy of the job at a private prepared input, then takes work items
// [0, items) in chunks from a shared counter, so a thread preempted by another process (the
// norm on phones and shared boards) does not hold up the whole layer.  Chunks are multiples
// of `align` items so that two threads rarely write the same output cache line.
template <class Prep>
void run(int team, int64_t items, int64_t align, RangeFn fn, const Job& j, Prep&& prep) {
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(team, items / align)));
  if (nt == 1) {
    Job mine = j;
    prep(mine, 0);
    fn(mine, 0, items);
    return;
  }
  const int64_t chunk = round_up(std::max<int64_t>(1, items / (int64_t(nt) * 8)), align);
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    Job mine = j;
    prep(mine, thread_id());
    for (int64_t a; (a = next.fetch_add(chunk, std::memory_order_relaxed)) < items;)
      fn(mine, a, std::min(items, a + chunk));
  }
}

// Work items covering a multiple of 16 rows (one cache line of fp32 outputs per batch row).
int64_t line_align(int rows_per_item, int64_t items_per_row_block) {
  int64_t blocks = 1;
  while (blocks * rows_per_item % 16) ++blocks;
  return blocks * items_per_row_block;
}

// ---------------------------------------------------------------- tap planes (conv input layout)
//
// For kernel column jj and row phase pi of the stride, plane[a][b] = xpad[a*sh + pi][b*sw + jj], rows
// padded to VW floats.  Tap (c, i, jj) then reads the contiguous run plane(c, jj, i % sh) + (i / sh) * VW
// + [oh * VW + ow] (its `lut` offset), so a conv is a dense [cols, OH * VW] operand for the row kernel;
// columns ow >= OW are computed and dropped.  The forward prepares planes from x (`prep`); the backward
// also folds a gradient w.r.t. the planes back onto x (`unprep`, prep's adjoint).
struct Taps {
  int64_t H, W, kh, kw, sh, sw, ph, pw, OH, OW, VW, nph, PHh, plane, cstride;
  std::vector<int64_t> lo, hi;  // plane columns [lo[jj], hi[jj]) read source columns inside [0, W)
  bool block_copy;

  // `plane` = 0: PHh * VW floats per plane; the forward's flat 1x1 layout passes its own.
  Taps(int64_t H_, int64_t W_, int64_t kh_, int64_t kw_, int64_t sh_, int64_t sw_, int64_t ph_, int64_t pw_,
       int64_t VW_, int64_t plane_)
      : H(H_), W(W_), kh(kh_), kw(kw_), sh(sh_), sw(sw_), ph(ph_), pw(pw_),
        OH((H_ + 2 * ph_ - kh_) / sh_ + 1), OW((W_ + 2 * pw_ - kw_) / sw_ + 1), VW(VW_),
        nph(std::min(sh_, kh_)), PHh(OH + (kh_ - 1) / sh_), plane(plane_ ? plane_ : PHh * VW_),
        cstride(kw_ * nph * plane), lo(size_t(kw_)), hi(size_t(kw_)),
        // With stride 1 on both axes and plane rows exactly as wide as x's, a tap plane's interior is
        // x's channel shifted by a constant: one block copy, then the padding columns are cleared.
        // Per-row copies cost a library call each (~40 us for a 128-channel 16x16 3x3 input here).
        // A row stride > 1 samples every sh-th source row, which no constant shift describes.
        block_copy(sh_ == 1 && sw_ == 1 && VW_ == W_) {
    for (int64_t jj = 0; jj < kw; ++jj) {
      const int64_t l = std::min(OW, std::max<int64_t>(0, (pw - jj + sw - 1) / sw));
      const int64_t last = W - 1 + pw - jj;
      lo[size_t(jj)] = l;
      hi[size_t(jj)] = last < 0 ? l : std::max(l, std::min(OW, last / sw + 1));
    }
  }

  // Plane rows [a0, a1) of phase pi have their source row a*sh + pi - ph inside [0, H).  When even the
  // last source row is above this phase (H - 1 + ph < pi), no row is: C++ division truncates towards
  // zero, so the negative case is handled apart, as the columns' is.
  void rows_of(int64_t pi, int64_t& a0, int64_t& a1) const {
    a0 = std::min(PHh, std::max<int64_t>(0, (ph - pi + sh - 1) / sh));
    const int64_t last_row = H - 1 + ph - pi;
    a1 = last_row < 0 ? a0 : std::max(a0, std::min(PHh, last_row / sh + 1));
  }

  // Tap offsets of the C * kh * kw columns inside one image's planes.
  std::unique_ptr<int32_t[]> lut(int64_t C) const {
    const int64_t taps = kh * kw;
    std::unique_ptr<int32_t[]> t(new int32_t[size_t(C * taps)]);
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t jj = 0; jj < kw; ++jj) t[size_t(i * kw + jj)] = int32_t((jj * nph + i % sh) * plane + (i / sh) * VW);
    for (int64_t c = 1; c < C; ++c)
      for (int64_t k = 0; k < taps; ++k) t[size_t(c * taps + k)] = int32_t(c * cstride) + t[size_t(k)];
    return t;
  }

  // One channel's planes from its [H, W] source.
  void prep(const float* src, float* dst) const {
    std::fill(dst + kw * nph * PHh * VW, dst + cstride, 0.f);  // flat plane's rounding
    for (int64_t jj = 0; jj < kw; ++jj) {
      const int64_t l = lo[size_t(jj)], h = hi[size_t(jj)];
      for (int64_t pi = 0; pi < nph; ++pi) {
        float* pl = dst + (jj * nph + pi) * plane;
        int64_t a0, a1;
        rows_of(pi, a0, a1);
        std::fill(pl, pl + a0 * VW, 0.f);
        std::fill(pl + a1 * VW, pl + PHh * VW, 0.f);
        if (block_copy && a1 > a0) {
          // pl[a*VW + b] = src[(a - ph)*W + b + jj - pw], clipped to the channel.
          const int64_t shift = jj - pw - ph * W;
          const int64_t p0 = std::max(a0 * VW, -shift), p1 = std::min(a1 * VW, H * W - shift);
          std::copy(src + p0 + shift, src + p1 + shift, pl + p0);
          std::fill(pl + a0 * VW, pl + p0, 0.f);
          std::fill(pl + p1, pl + a1 * VW, 0.f);
          // Column-wise: a strided loop stays inline where a row-wise one becomes memset calls.
          for (int64_t b = 0; b < VW; ++b)
            if (b < l || b >= h)
              for (int64_t a = a0; a < a1; ++a) pl[a * VW + b] = 0.f;
          continue;
        }
        for (int64_t a = a0; a < a1; ++a) {
          float* __restrict drow = pl + a * VW;
          const float* __restrict r = src + (a * sh + pi - ph) * W + jj - pw;  // r[b * sw], b in [l, h)
          std::fill(drow, drow + l, 0.f);
          if (sw == 1)
            std::copy(r + l, r + h, drow + l);
          else
            for (int64_t b = l; b < h; ++b) drow[b] = r[b * sw];
          std::fill(drow + h, drow + VW, 0.f);
        }
      }
    }
  }

  // prep's adjoint: src[source of every copied plane entry] += that entry (padding entries drop out).
  void unprep(const float* dst, float* src) const {
    for (int64_t jj = 0; jj < kw; ++jj) {
      const int64_t l = lo[size_t(jj)], h = hi[size_t(jj)];
      for (int64_t pi = 0; pi < nph; ++pi) {
        const float* pl = dst + (jj * nph + pi) * plane;
        int64_t a0, a1;
        rows_of(pi, a0, a1);
        for (int64_t a = a0; a < a1; ++a) {
          const float* __restrict drow = pl + a * VW;
          float* __restrict r = src + (a * sh + pi - ph) * W + jj - pw;
          if (sw == 1)
            for (int64_t b = l; b < h; ++b) r[b] += drow[b];
          else
            for (int64_t b = l; b < h; ++b) r[b * sw] += drow[b];
        }
      }
    }
  }
};

// ---------------------------------------------------------------- ops

void linear_compute(const Packed& p, Job j, const float* xs, int64_t B, int64_t in, int threads);

void linear(uintptr_t x, int64_t B, int64_t in, uintptr_t values, int64_t nvals,
            uintptr_t indices, int64_t nidx, bool idx32, uintptr_t bands, int64_t nb,
            int64_t rows, uintptr_t scale, uintptr_t shift, bool relu, int threads,
            bool check_indices, uintptr_t out) {
  const char* op = "packed_linear";
  const Packed p = check_packed(op, values, nvals, indices, nidx, idx32, bands, nb, rows, in);
  check_threads(op, threads);
  if (check_indices) check_index_range(op, p, rows, in, threads);
  py::gil_scoped_release nogil;
  linear_compute(p, base_job(p, rows, scale, shift, relu, out), ptr<const float>(x), B, in, threads);
}

// The forward itself, on checked arguments (the GIL may be released).
void linear_compute(const Packed& p, Job j, const float* xs, int64_t B, int64_t in, int threads) {
  const int64_t rows = j.rows;
  j.n = B;
  j.batch_major = true;
  if (B == 0 || rows == 0) return;
  const int isa = g_isa.load();
  if (B == 1) {
    j.x = xs;
    run(team_for(threads, rows * p.width_sum), (rows + kDotRows - 1) / kDotRows, line_align(kDotRows, 1),
        p.idx32 ? dot_fn<int32_t>(isa) : dot_fn<int16_t>(isa), j, [](Job&, int) {});
    return;
  }
  // x^T padded to [in, ldx] so each column index reads a contiguous batch vector.  Every
  // thread transposes its own copy: reading another core's freshly written lines cost more
  // than the duplicated transpose (2 threads were slower than 1 on small layers).
  const int vl = pick_vl(isa, B);
  const Plan plan = choose_spmm(isa, p.idx32, false, vl, B);
  const int64_t ldx = round_up(B, plan.cols_per_tile), slice = round_up(in * ldx, 16);
  const int64_t nnc = ldx / plan.cols_per_tile;
  const int64_t items = (rows + plan.rows_per_tile - 1) / plan.rows_per_tile * nnc;
  const int team = team_for(threads, rows * p.width_sum * (ldx / vl));
  const Buffer xt = aligned_floats(team * slice);
  j.ldx = ldx;
  run(team, items, line_align(plan.rows_per_tile, nnc), plan.fn, j, [&](Job& mine, int t) {
    float* xtp = xt.get() + t * slice;
    constexpr int64_t CB = 64;
    for (int64_t c0 = 0; c0 < in; c0 += CB) {
      const int64_t c1 = std::min(in, c0 + CB);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = c0; c < c1; ++c) xtp[c * ldx + b] = xs[b * in + c];
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t b = B; b < ldx; ++b) xtp[c * ldx + b] = 0.f;
    }
    mine.x = xtp;
  });
}

void conv2d_compute(const Packed& p, Job j, const float* xs, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                    int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int threads);

void conv2d(uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, uintptr_t values,
            int64_t nvals, uintptr_t indices, int64_t nidx, bool idx32, uintptr_t bands,
            int64_t nb, int64_t rows, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
            int64_t pw, uintptr_t scale, uintptr_t shift, bool relu, int threads,
            bool check_indices, uintptr_t out, int64_t out_h, int64_t out_w) {
  const char* op = "packed_conv2d";
  const Packed p = check_conv(op, values, nvals, indices, nidx, idx32, bands, nb, rows, C, H, W, kh, kw, sh, sw,
                              ph, pw, threads, check_indices, out_h, out_w);
  py::gil_scoped_release nogil;
  conv2d_compute(p, base_job(p, rows, scale, shift, relu, out), ptr<const float>(x), B, C, H, W, kh, kw, sh, sw, ph,
                 pw, threads);
}

// The forward itself, on checked arguments (check_conv: the tap offsets fit in 32 bits; the GIL may be released).
void conv2d_compute(const Packed& p, Job j, const float* xs, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                    int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int threads) {
  const int64_t rows = j.rows;
  const int64_t OH = (H + 2 * ph - kh) / sh + 1, OW = (W + 2 * pw - kw) / sw + 1;

  // Tap planes (see Taps).  A stride-1 1x1 conv has no shifted taps: one unpadded plane per channel
  // (VW = OW), whose stride is rounded to whole vectors only to keep channel starts aligned.
  const int isa = g_isa.load();
  const bool pointwise = kh == 1 && kw == 1, flat = pointwise && sh == 1 && sw == 1;
  const int vl = pick_vl(isa, flat ? OH * OW : OW);
  const int64_t VW = flat ? OW : round_up(OW, vl);
  const Taps taps(H, W, kh, kw, sh, sw, ph, pw, VW, flat ? round_up(OH * VW, vl) : 0);
  const int64_t N = OH * VW;
  const Plan plan = choose_spmm(isa, p.idx32, !pointwise, vl, N);
  const int64_t CH = plan.cols_per_tile;
  // x itself qualifies when no padding is needed and every tile stays inside it.
  const bool in_place = flat && ph == 0 && pw == 0 && N % CH == 0;
  const int64_t cstride = taps.cstride, img_stride = C * cstride;
  j.n = N;
  j.images = B;
  j.vw = VW;
  j.oh = OH;
  j.ow = OW;
  j.ldx = cstride;
  j.x_img_stride = img_stride;
  if (B == 0 || rows == 0) return;

  std::unique_ptr<int32_t[]> lut;
  if (!pointwise) {
    lut = taps.lut(C);
    j.lut = lut.get();
  }
  const int64_t nnc = (N + CH - 1) / CH, tiles = (rows + plan.rows_per_tile - 1) / plan.rows_per_tile * nnc;
  const int64_t align = line_align(plan.rows_per_tile, nnc);
  const int team = team_for(threads, B * rows * p.width_sum * (round_up(N, CH) / vl));
  if (in_place) {
    j.x = xs;
    run(team, B * tiles, align, plan.fn, j, [](Job&, int) {});
    return;
  }
  // Tail: the last tile of an image may read up to a tile past its planes.
  const int64_t tail = round_up(N, CH);
  if (B < team) {
    // Few images: every thread prepares all of them privately, then the tiles are shared out
    // (reading planes another core just wrote cost more than preparing them twice).
    const int64_t slice = round_up(B * img_stride + tail, 16);
    const Buffer buf = aligned_floats(team * slice);
    run(team, B * tiles, align, plan.fn, j, [&](Job& mine, int t) {
      float* pp = buf.get() + t * slice;
      std::fill(pp + B * img_stride, pp + B * img_stride + tail, 0.f);
      for (int64_t bc = 0; bc < B * C; ++bc) taps.prep(xs + bc * H * W, pp + bc * cstride);
      mine.x = pp;
    });
    return;
  }
  // Enough images: each thread prepares and computes whole images in its own scratch slice,
  // so nothing is prepared twice and an image stays in one core's cache.
  const int64_t slice = round_up(img_stride + tail, 16);
  const Buffer buf = aligned_floats(team * slice);
  float* ws = buf.get();
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(team) if (team > 1)
  {
    float* mine = ws + thread_id() * slice;
    std::fill(mine + img_stride, mine + img_stride + tail, 0.f);
    Job ji = j;
    ji.images = 1;
    ji.x = mine;
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < B;) {
      for (int64_t c = 0; c < C; ++c) taps.prep(xs + (b * C + c) * H * W, mine + c * cstride);
      ji.out = j.out + b * rows * OH * OW;
      plan.fn(ji, 0, tiles);
    }
  }
}

// ---------------------------------------------------------------- whole-network plans
//
// A plan is a subnet's forward as a program of fixed-size int64 records, run in one call per batch: no
// Python and no allocation between layers.  Every record reads and writes numbered slots (activation
// buffers the caller allocates once per batch size; slot 0 is the input); all records are checked before
// anything runs, sizes against the slots' capacities included, so no program can make an op read or
// write outside its buffers.  Record fields (kPlanFields int64 each):
//   [0] op  [1] input slot  [2] output slot  [3] second input slot (add) or -1
//   conv / linear: [4] values [5] nvals [6] indices [7] nidx [8] idx32 [9] bands [10] nb [11] rows
//   all:           [12] C (linear: in features; add: floats per image) [13] H [14] W
//   conv / pool:   [15] kh [16] kw [17] sh [18] sw [19] ph [20] pw
//   conv / linear: [21] scale [22] shift (pointers, 0 = none)   all: [23] relu
enum PlanOp : int64_t { kPlanConv = 0, kPlanLinear = 1, kPlanMaxPool = 2, kPlanMeanPool = 3, kPlanAdd = 4 };
constexpr int64_t kPlanFields = 24;

struct PlanStep {
  const int64_t* f;
  Packed p;
  int64_t in_size, out_size;  // floats per image
};

void max_pool(const float* x, float* y, int64_t planes, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh,
              int64_t sw, int threads) {
  const int64_t OH = (H - kh) / sh + 1, OW = (W - kw) / sw + 1;
#pragma omp parallel for num_threads(team_for(threads, planes * OH * OW * kh * kw)) schedule(static)
  for (int64_t c = 0; c < planes; ++c) {
    const float* xc = x + c * H * W;
    float* yc = y + c * OH * OW;
    for (int64_t a = 0; a < OH; ++a)
      for (int64_t b = 0; b < OW; ++b) {
        float m = xc[a * sh * W + b * sw];
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t k = 0; k < kw; ++k) m = std::max(m, xc[(a * sh + i) * W + b * sw + k]);
        yc[a * OW + b] = m;
      }
  }
}

void run_plan(uintptr_t program, int64_t nops, uintptr_t slots, int64_t nslots, int64_t B, int threads) {
  const char* op = "native plan";
  check_threads(op, threads);
  if (nops < 0 || nslots < 1 || B < 0) fail(op, "empty program or no slots");
  const int64_t* prog = ptr<const int64_t>(program);
  const int64_t* slot = ptr<const int64_t>(slots);  // per slot: data pointer, capacity in floats
  std::vector<PlanStep> steps(static_cast<size_t>(nops));
  auto in_slot = [&](int64_t s, int64_t i) {
    if (s < 0 || s >= nslots) fail(op, "record " + std::to_string(i) + " names slot " + std::to_string(s));
    return s;
  };
  for (int64_t i = 0; i < nops; ++i) {
    const int64_t* f = prog + i * kPlanFields;
    PlanStep& st = steps[size_t(i)];
    st.f = f;
    in_slot(f[1], i);
    in_slot(f[2], i);
    const int64_t C = f[12], H = f[13], W = f[14];
    if (C < 0 || H < 0 || W < 0) fail(op, "record " + std::to_string(i) + " has a negative size");
    switch (f[0]) {
      case kPlanConv: {
        const int64_t OH = (H + 2 * f[19] - f[15]) / std::max<int64_t>(1, f[17]) + 1;
        const int64_t OW = (W + 2 * f[20] - f[16]) / std::max<int64_t>(1, f[18]) + 1;
        st.p = check_conv(op, uintptr_t(f[4]), f[5], uintptr_t(f[6]), f[7], f[8] != 0, uintptr_t(f[9]), f[10],
                          f[11], C, H, W, f[15], f[16], f[17], f[18], f[19], f[20], threads, false, OH, OW);
        st.in_size = C * H * W;
        st.out_size = f[11] * OH * OW;
        break;
      }
      case kPlanLinear:
        st.p = check_packed(op, uintptr_t(f[4]), f[5], uintptr_t(f[6]), f[7], f[8] != 0, uintptr_t(f[9]), f[10],
                            f[11], C);
        st.in_size = C;
        st.out_size = f[11];
        break;
      case kPlanMaxPool:
        if (f[15] < 1 || f[16] < 1 || f[17] < 1 || f[18] < 1 || H < f[15] || W < f[16])
          fail(op, "record " + std::to_string(i) + ": pooling window outside its input");
        st.in_size = C * H * W;
        st.out_size = C * ((H - f[15]) / f[17] + 1) * ((W - f[16]) / f[18] + 1);
        break;
      case kPlanMeanPool:
        st.in_size = C * H * W;
        st.out_size = C;
        break;
      case kPlanAdd:
        in_slot(f[3], i);
        st.in_size = st.out_size = C;
        if (B * C > slot[2 * f[3] + 1]) fail(op, "record " + std::to_string(i) + " reads past its second slot");
        break;
      default:
        fail(op, "record " + std::to_string(i) + " has unknown op " + std::to_string(f[0]));
    }
    if (B * st.in_size > slot[2 * f[1] + 1] || B * st.out_size > slot[2 * f[2] + 1])
      fail(op, "record " + std::to_string(i) + " reads or writes past its slots");
    if (f[1] == f[2] && f[0] != kPlanAdd) fail(op, "record " + std::to_string(i) + " writes over its own input");
  }
  py::gil_scoped_release nogil;
  for (const PlanStep& st : steps) {
    const int64_t* f = st.f;
    const float* x = reinterpret_cast<const float*>(slot[2 * f[1]]);
    float* y = reinterpret_cast<float*>(slot[2 * f[2]]);
    const bool relu = f[23] != 0;
    switch (f[0]) {
      case kPlanConv: {
        Job j = base_job(st.p, f[11], uintptr_t(f[21]), uintptr_t(f[22]), relu, uintptr_t(y));
        conv2d_compute(st.p, j, x, B, f[12], f[13], f[14], f[15], f[16], f[17], f[18], f[19], f[20], threads);
        break;
      }
      case kPlanLinear:
        linear_compute(st.p, base_job(st.p, f[11], uintptr_t(f[21]), uintptr_t(f[22]), relu, uintptr_t(y)), x, B,
                       f[12], threads);
        break;
      case kPlanMaxPool:
        max_pool(x, y, B * f[12], f[13], f[14], f[15], f[16], f[17], f[18], threads);
        break;
      case kPlanMeanPool: {
        const int64_t hw = f[13] * f[14];
        const float inv = hw ? 1.f / float(hw) : 0.f;
        for (int64_t c = 0; c < B * f[12]; ++c) {
          float acc = 0.f;
          for (int64_t k = 0; k < hw; ++k) acc += x[c * hw + k];
          y[c] = acc * inv;
        }
        break;
      }
      case kPlanAdd: {
        const float* z = reinterpret_cast<const float*>(slot[2 * f[3]]);
        const int64_t n = B * f[12];
#pragma omp parallel for num_threads(team_for(threads, n)) schedule(static)
        for (int64_t k = 0; k < n; ++k) {
          const float v = x[k] + z[k];
          y[k] = relu ? std::max(v, 0.f) : v;
        }
        break;
      }
    }
  }
}

// ---------------------------------------------------------------- backward ops
//
// Gradients of the forward without epilogue (training applies BN, bias and ReLU in torch): the values'
// gradient only at stored positions of the bands passed, the input's through the transposed bands.  Every
// thread needs every stored entry, so threads split the columns (linear) or the images (conv); all but
// the first accumulate the values' gradient in a private buffer, summed at the end.

int team_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Entries [0, extent) of the buffers cover every band passed.
int64_t band_extent(const Packed& p, int64_t rows) {
  int64_t extent = 0;
  for (const Band& b : p.bands) extent = std::max(extent, b.off + rows * b.width);
  return extent;
}

Buffer zeroed_floats(int64_t n) {
  Buffer b = aligned_floats(n);
  std::fill(b.get(), b.get() + std::max<int64_t>(n, 1), 0.f);
  return b;
}

void add_parts(float* dv, const float* parts, int count, int64_t extent) {
  for (int t = 0; t < count; ++t)
    for (int64_t e = 0; e < extent; ++e) dv[e] += parts[t * extent + e];
}

// src [n, m] row-major -> dst [m, ld], columns n..ld zero.
void transpose_padded(const float* src, int64_t n, int64_t m, int64_t ld, float* dst) {
  constexpr int64_t CB = 64;
  for (int64_t c0 = 0; c0 < m; c0 += CB) {
    const int64_t c1 = std::min(m, c0 + CB);
    for (int64_t b = 0; b < n; ++b)
      for (int64_t c = c0; c < c1; ++c) dst[c * ld + b] = src[b * m + c];
    for (int64_t c = c0; c < c1; ++c) std::fill(dst + c * ld + n, dst + (c + 1) * ld, 0.f);
  }
}

void linear_backward(uintptr_t x, int64_t B, int64_t in, uintptr_t grad_out, uintptr_t values, int64_t nvals,
                     uintptr_t indices, int64_t nidx, bool idx32, uintptr_t bands, int64_t nb, int64_t rows,
                     int threads, bool check_indices, uintptr_t grad_x, uintptr_t grad_values) {
  const char* op = "packed_linear_backward";
  const Packed p = check_packed(op, values, nvals, indices, nidx, idx32, bands, nb, rows, in);
  check_threads(op, threads);
  if (check_indices) check_index_range(op, p, rows, in, threads);
  float* gx = ptr<float>(grad_x);
  float* gv = ptr<float>(grad_values);
  py::gil_scoped_release nogil;
  if (gx) std::fill(gx, gx + B * in, 0.f);
  if (B == 0 || rows == 0 || (!gx && !gv)) return;
  const int isa = g_isa.load();
  const int vl = pick_vl(isa, B);
  const int64_t ldx = round_up(B, vl), nv = ldx / vl, extent = band_extent(p, rows);
  // x, the output gradient and the input gradient transposed to [*, ldx]: every stored entry then works
  // on one contiguous batch vector, as in the forward.
  const Buffer xt = gv ? aligned_floats(in * ldx) : Buffer();
  const Buffer gt = aligned_floats(rows * ldx);
  const Buffer dxt = gx ? zeroed_floats(in * ldx) : Buffer();
  if (gv) transpose_padded(ptr<const float>(x), B, in, ldx, xt.get());
  transpose_padded(ptr<const float>(grad_out), B, rows, ldx, gt.get());
  GradJob j;
  j.vals = p.vals;
  j.idx = p.idx;
  j.bands = p.bands.data();
  j.nb = int(p.bands.size());
  j.rows = rows;
  j.ldx = ldx;
  j.x = xt.get();
  j.dx = dxt.get();
  j.g = gt.get();
  j.ldg = ldx;
  j.dv = gv;
  const GradFn fn = grad_fn(isa, p.idx32, vl);
  const int team = int(std::min<int64_t>(nv, team_for(threads, rows * p.width_sum * nv * (gx && gv ? 2 : 1))));
  const Buffer parts = gv && team > 1 ? zeroed_floats((team - 1) * extent) : Buffer();
#pragma omp parallel num_threads(team) if (team > 1)
  for (int t = thread_id(); t < team; t += team_threads()) {  // chunk t: vectors [nv*t/team, nv*(t+1)/team)
    GradJob mine = j;
    if (gv && t > 0) mine.dv = parts.get() + (t - 1) * extent;
    fn(mine, nv * t / team * vl, nv * (t + 1) / team * vl);
  }
  if (parts) add_parts(gv, parts.get(), team - 1, extent);
  if (gx)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < in; ++c) gx[b * in + c] = dxt[size_t(c * ldx + b)];
}

void conv2d_backward(uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, uintptr_t grad_out,
                     uintptr_t values, int64_t nvals, uintptr_t indices, int64_t nidx, bool idx32,
                     uintptr_t bands, int64_t nb, int64_t rows, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                     int64_t ph, int64_t pw, int threads, bool check_indices, uintptr_t grad_x,
                     uintptr_t grad_values, int64_t out_h, int64_t out_w) {
  const char* op = "packed_conv2d_backward";
  const Packed p = check_conv(op, values, nvals, indices, nidx, idx32, bands, nb, rows, C, H, W, kh, kw, sh, sw,
                              ph, pw, threads, check_indices, out_h, out_w);
  const int64_t OH = out_h, OW = out_w;
  float* gx = ptr<float>(grad_x);
  float* gv = ptr<float>(grad_values);
  const int isa = g_isa.load();
  const int vl = pick_vl(isa, OW);
  const Taps taps(H, W, kh, kw, sh, sw, ph, pw, round_up(OW, vl), 0);
  const int64_t VW = taps.VW, N = OH * VW, img_stride = C * taps.cstride, extent = band_extent(p, rows);
  py::gil_scoped_release nogil;
  if (gx) std::fill(gx, gx + B * C * H * W, 0.f);
  if (B == 0 || rows == 0 || (!gx && !gv)) return;
  const std::unique_ptr<int32_t[]> lut = taps.lut(C);
  GradJob j;
  j.vals = p.vals;
  j.idx = p.idx;
  j.bands = p.bands.data();
  j.nb = int(p.bands.size());
  j.rows = rows;
  j.lut = lut.get();
  j.ldg = N;
  const GradFn fn = grad_fn(isa, p.idx32, vl);
  const int team = int(std::min<int64_t>(B, team_for(threads, B * rows * p.width_sum * (N / vl))));
  // Per thread: the image's planes (for dv), their gradient (for dx) and the output gradient in the
  // forward's [rows, OH * VW] layout, zeros in the columns past OW.
  const int64_t planes = gv ? img_stride : 0, dplanes = gx ? img_stride : 0;
  const int64_t slice = round_up(planes, 16) + round_up(dplanes, 16) + round_up(rows * N, 16);
  const Buffer scratch = aligned_floats(team * slice);
  const Buffer parts = gv && team > 1 ? zeroed_floats((team - 1) * extent) : Buffer();
  const float* xs = ptr<const float>(x);
  const float* go = ptr<const float>(grad_out);
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(team) if (team > 1)
  {
    const int t = thread_id();
    float* base = scratch.get() + t * slice;
    GradJob mine = j;
    float* planes_of_b = base;
    mine.x = base;
    mine.dx = gx ? base + round_up(planes, 16) : nullptr;
    float* g = base + round_up(planes, 16) + round_up(dplanes, 16);
    mine.g = g;
    mine.dv = !gv ? nullptr : t == 0 ? gv : parts.get() + (t - 1) * extent;
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < B;) {
      if (gv)
        for (int64_t c = 0; c < C; ++c) taps.prep(xs + (b * C + c) * H * W, planes_of_b + c * taps.cstride);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t oy = 0; oy < OH; ++oy) {
          const float* src = go + ((b * rows + r) * OH + oy) * OW;
          float* dst = g + r * N + oy * VW;
          std::copy(src, src + OW, dst);
          std::fill(dst + OW, dst + VW, 0.f);
        }
      if (gx) std::fill(mine.dx, mine.dx + img_stride, 0.f);
      fn(mine, 0, N);
      if (gx)
        for (int64_t c = 0; c < C; ++c) taps.unprep(mine.dx + c * taps.cstride, gx + (b * C + c) * H * W);
    }
  }
  if (parts) add_parts(gv, parts.get(), team - 1, extent);
}

void validate_indices(uintptr_t indices, int64_t nidx, bool idx32, uintptr_t bands, int64_t nb,
                      int64_t rows, int64_t cols, int threads) {
  const char* op = "validate_indices";
  check_threads(op, threads);
  Packed p = check_bands(op, bands, nb, rows, nidx);
  if (p.width_sum > cols)
    fail(op, "the bands hold " + std::to_string(p.width_sum) + " entries per row but rows have only " +
                 std::to_string(cols) + " columns");
  p.idx = ptr<const void>(indices);
  p.idx32 = idx32;
  check_index_range(op, p, rows, cols, threads);
}

void set_isa(const std::string& name) {
  const int want = name == "avx512" ? kAvx512 : name == "avx2" ? kAvx2 : name == "generic" ? kGeneric : -1;
  if (want < 0) throw py::value_error("unknown ISA '" + name + "' (avx512, avx2, generic)");
  if (want > g_best_isa)
    throw py::value_error(std::string("this CPU/build supports at most ") + isa_name(g_best_isa));
  g_isa.store(want);
}

}  // namespace

PYBIND11_MODULE(_packed_sparse, m) {
  m.doc() = "Packed nested row-sparse (DRESS banded layout) CPU kernels; use dress_model.kernels";
  m.def("linear", &linear);
  m.def("conv2d", &conv2d);
  m.def("linear_backward", &linear_backward);
  m.def("conv2d_backward", &conv2d_backward);
  m.def("validate_indices", &validate_indices);
  m.def("run_plan", &run_plan);
  m.attr("plan_fields") = kPlanFields;
  py::dict ops;
  ops["conv"] = int64_t(kPlanConv);
  ops["linear"] = int64_t(kPlanLinear);
  ops["max_pool"] = int64_t(kPlanMaxPool);
  ops["mean_pool"] = int64_t(kPlanMeanPool);
  ops["add"] = int64_t(kPlanAdd);
  m.attr("plan_ops") = ops;
  m.def("set_isa", &set_isa, py::arg("name"));
  m.def("isa", [] { return std::string(isa_name(g_isa.load())); });
  m.def("best_isa", [] { return std::string(isa_name(g_best_isa)); });
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
