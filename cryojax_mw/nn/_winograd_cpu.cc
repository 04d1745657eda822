// Winograd F(4, k)^3 convolutions of channels-last volumes for XLA:CPU (k = 2, 3), called
// through the XLA FFI (jax.ffi.ffi_call) by `_conv.py`. Two kernels:
//   winograd_forward:     y = epilogue(conv(x, g)) from the transformed kernel U = G g G^T
//                         (alpha^3, Ci, Co), 'same' padding (pad_lo given), optional bias and ReLU;
//   winograd_weight_grad: dU = sum over tiles of (B^T x B)^T (A dy A^T), the gradient with
//                         respect to U; the kernel transform and its transpose stay in JAX.
// The gradient with respect to x is a forward call with the flipped kernel.
//
// What the U-Net needs without extra passes over memory: an input may be two arrays read as their
// concatenation along channels (the decoder's skip connection), an output two arrays that split
// its channels (that concatenation's gradient); either may be "up-sampled": stored at twice the
// resolution with the 8 parities of each low-resolution voxel folded into channels p * C + c
// (the up-convolution, computed at low resolution, writes its result in place at the high one);
// an input may be masked by a second array (dy * (y > 0), the ReLU's gradient).
//
// Why a kernel of our own: XLA:CPU runs 3D convolutions through generic loops (about 35 GFLOP/s on
// 2 cores where its matmuls reach 175), and expressing the Winograd transforms as XLA ops writes
// every transformed tile to memory (3.4 times the input at F(4, 3)). Here a block of tiles is
// transformed, multiplied and transformed back while it stays in the core's cache.
//
// Vectors are GCC vector extensions of 16 floats; every hot function is compiled for AVX-512,
// AVX2 + FMA and the baseline, and the best one for the running CPU is chosen at load time.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(64)));

INLINE vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}
INLINE void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

// Zero-initialised floats on 64-byte boundaries: no vector access of a scratch buffer straddles
// two cache lines (std::vector aligns to 16 bytes).
class AlignedFloats {
 public:
  void allocate(size_t n) {
    data_.reset(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64)));
    std::memset(data_.get(), 0, n * sizeof(float));
    size_ = n;
  }
  bool empty() const { return size_ == 0; }
  size_t size() const { return size_; }
  float* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  size_t size_ = 0;
};

// Winograd matrices (Lavin & Gray 2016) for output tiles of m = 4: B^T (alpha x alpha) and A^T
// (m x alpha) of F(4, 3) and F(4, 2). They pair with the kernel transforms G built in
// `_unet._winograd_matrices`; the tests compare the convolution with lax's. Kept as constants so
// that the compiler unrolls the transforms and drops the zero and unit coefficients.
template <int N_OUT, int N_IN>
struct Matrix {
  float c[N_OUT][N_IN];
};
constexpr Matrix<6, 6> kInput43 = {{{4, 0, -5, 0, 1, 0},
                                    {0, -4, -4, 1, 1, 0},
                                    {0, 4, -4, -1, 1, 0},
                                    {0, -2, -1, 2, 1, 0},
                                    {0, 2, -1, -2, 1, 0},
                                    {0, 4, 0, -5, 0, 1}}};
constexpr Matrix<4, 6> kOutput43 = {
    {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}}};
constexpr Matrix<5, 5> kInput42 = {{{2, -1, -2, 1, 0},
                                    {0, -2, -1, 1, 0},
                                    {0, 2, -3, 1, 0},
                                    {0, -1, 0, 1, 0},
                                    {0, 2, -1, -2, 1}}};
constexpr Matrix<4, 5> kOutput42 = {
    {{1, 1, 1, 1, 0}, {0, 1, -1, 2, 0}, {0, 1, 1, 4, 0}, {0, 1, -1, 8, 1}}};

template <int N_OUT, int N_IN>
constexpr Matrix<N_IN, N_OUT> transposed(const Matrix<N_OUT, N_IN>& t) {
  Matrix<N_IN, N_OUT> out{};
  for (int i = 0; i < N_OUT; ++i)
    for (int j = 0; j < N_IN; ++j) out.c[j][i] = t.c[i][j];
  return out;
}
constexpr Matrix<6, 4> kOutputT43 = transposed(kOutput43);
constexpr Matrix<5, 4> kOutputT42 = transposed(kOutput42);

// out[i] = sum_j T[i][j] in[j], unrolled, zero coefficients skipped; `in` is read into
// registers first.
template <int N_OUT, int N_IN, const Matrix<N_OUT, N_IN>& T>
INLINE void transform_line(const vec (&in)[N_IN], vec (&out)[N_OUT]) {
#pragma GCC unroll 8
  for (int i = 0; i < N_OUT; ++i) {
    vec acc = {};
#pragma GCC unroll 8
    for (int j = 0; j < N_IN; ++j)
      if (T.c[i][j] != 0.0f) acc += in[j] * T.c[i][j];
    out[i] = acc;
  }
}

// F(4, 3) factored by hand (shared differences): 12 operations per line of B^T instead of 22,
// 10 of A^T instead of 18, 9 of A instead of 14; the same matrices as kInput43, kOutput43 and
// kOutputT43 (the tests compare the convolutions with lax's).
template <>
INLINE void transform_line<6, 6, kInput43>(const vec (&d)[6], vec (&out)[6]) {
  const vec t1 = d[4] - 4.0f * d[2], t2 = d[3] - 4.0f * d[1];
  const vec t3 = d[4] - d[2], t4 = 2.0f * (d[3] - d[1]);
  out[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
  out[1] = t1 + t2;
  out[2] = t1 - t2;
  out[3] = t3 + t4;
  out[4] = t3 - t4;
  out[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}
template <>
INLINE void transform_line<4, 6, kOutput43>(const vec (&d)[6], vec (&out)[4]) {
  const vec s1 = d[1] + d[2], s2 = d[1] - d[2], s3 = d[3] + d[4], s4 = d[3] - d[4];
  out[0] = d[0] + s1 + s3;
  out[1] = s2 + 2.0f * s4;
  out[2] = s1 + 4.0f * s3;
  out[3] = s2 + 8.0f * s4 + d[5];
}
template <>
INLINE void transform_line<6, 4, kOutputT43>(const vec (&d)[4], vec (&out)[6]) {
  const vec e = d[0] + d[2], o = d[1] + d[3];
  const vec e2 = d[0] + 4.0f * d[2], o2 = 2.0f * d[1] + 8.0f * d[3];
  out[0] = d[0];
  out[1] = e + o;
  out[2] = e - o;
  out[3] = e2 + o2;
  out[4] = e2 - o2;
  out[5] = d[3];
}

// The 3D transform T (x) T (x) T of an N_IN^3 cube of vectors into an N_OUT^3 cube, (z, y, x)
// order: read(i, j, k) gives input vector (i, j, k), write(index, v) takes output vector index
// (z * N_OUT + y) * N_OUT + x. The first pass reads the input where it lies and the last writes
// where it goes, so only two passes' worth of vectors go through the stack.
template <int N_OUT, int N_IN, const Matrix<N_OUT, N_IN>& T, typename Read, typename Write>
INLINE void transform_3d(Read&& read, Write&& write) {
  constexpr int I = N_IN, O = N_OUT;
  vec buf0[I * I * O], buf1[I * O * O];
  for (int a = 0; a < I; ++a)  // along x: (I, I, I) -> (I, I, O)
    for (int b = 0; b < I; ++b) {
      vec in[I], out[O];
#pragma GCC unroll 8
      for (int c = 0; c < I; ++c) in[c] = read(a, b, c);
      transform_line<O, I, T>(in, out);
#pragma GCC unroll 8
      for (int c = 0; c < O; ++c) buf0[(a * I + b) * O + c] = out[c];
    }
  for (int a = 0; a < I; ++a)  // along y: -> (I, O, O)
    for (int c = 0; c < O; ++c) {
      vec in[I], out[O];
#pragma GCC unroll 8
      for (int b = 0; b < I; ++b) in[b] = buf0[(a * I + b) * O + c];
      transform_line<O, I, T>(in, out);
#pragma GCC unroll 8
      for (int b = 0; b < O; ++b) buf1[(a * O + b) * O + c] = out[b];
    }
  for (int b = 0; b < O; ++b)  // along z: -> (O, O, O)
    for (int c = 0; c < O; ++c) {
      vec in[I], out[O];
#pragma GCC unroll 8
      for (int a = 0; a < I; ++a) in[a] = buf1[(a * O + b) * O + c];
      transform_line<O, I, T>(in, out);
#pragma GCC unroll 8
      for (int a = 0; a < O; ++a) write((a * O + b) * O + c, out[a]);
    }
}

constexpr int kTile = 4;  // output tile m of F(m, k) along every axis
// Output channels per pass of a block: the products of a block then fit beside its transformed
// input in L2 even for the up-convolutions' 384 and 512 channels.
constexpr int64_t kChannelChunk = 64;
// A block of consecutive tiles: its transformed input and one chunk of products about fill the
// 2 MiB that measured fastest on 1 MiB-L2 cores (768 KiB and 4 MiB were 10-15% slower in training,
// where few tiles per row make short blocks costly).
constexpr int64_t kBlockBytes = int64_t{2} << 20;
constexpr int64_t kMaxTiles = 64;
// Weight-gradient partial sums per thread of the pool (each alpha^3 Ci Co floats, 12 MB for the
// published U-Net's first up-convolution): more groups balance the threads better, at that cost.
constexpr int64_t kGroupsPerThread = 2;

template <int K>
struct Winograd;
template <>
struct Winograd<3> {
  static constexpr int kAlpha = 6;
  static constexpr const Matrix<6, 6>& kInput = kInput43;
  static constexpr const Matrix<4, 6>& kOutput = kOutput43;
  static constexpr const Matrix<6, 4>& kOutputT = kOutputT43;
};
template <>
struct Winograd<2> {
  static constexpr int kAlpha = 5;
  static constexpr const Matrix<5, 5>& kInput = kInput42;
  static constexpr const Matrix<4, 5>& kOutput = kOutput42;
  static constexpr const Matrix<5, 4>& kOutputT = kOutputT42;
};

// The low-resolution grid the convolution runs on.
struct Geometry {
  int64_t batch, depth, height, width;
  int64_t pad[3];    // low padding of z, y, x
  int64_t tiles[3];  // output tiles along z, y, x
};

// Batch item and first output voxel of tile `index` in (batch, z, y, x) order of the tiles.
struct TileOrigin {
  int64_t b, z, y, x;
};
INLINE TileOrigin tile_origin(const Geometry& g, int64_t index) {
  TileOrigin o;
  o.x = index % g.tiles[2] * kTile;
  index /= g.tiles[2];
  o.y = index % g.tiles[1] * kTile;
  index /= g.tiles[1];
  o.z = index % g.tiles[0] * kTile;
  o.b = index / g.tiles[0];
  return o;
}

// A (B, D, H, W, C) operand seen as channels: one or two arrays concatenated along channels,
// each optionally stored up-sampled ((B, 2D, 2H, 2W, C / 8), parity p = 4 pz + 2 py + px of
// channel p * C / 8 + c), optionally masked by an array of the same layout (value where the mask
// is positive, else 0).
struct Tensor {
  float* data[2] = {nullptr, nullptr};
  const float* mask[2] = {nullptr, nullptr};
  int64_t channels[2] = {0, 0};  // channels of each part as the convolution sees them
  int parts = 1;
  bool upsampled = false;
  int64_t total() const { return channels[0] + (parts == 2 ? channels[1] : 0); }
};

// Where the 16 channels from c on of batch item b lie: data + z * sz + y * sy + x * sx.
struct Locator {
  float* data;
  const float* mask;
  int64_t sz, sy, sx;
};

INLINE Locator locate(const Tensor& t, const Geometry& g, int64_t b, int64_t c) {
  const int part = (t.parts == 2 && c >= t.channels[0]) ? 1 : 0;
  if (part == 1) c -= t.channels[0];
  Locator l;
  int64_t offset;
  if (!t.upsampled) {
    const int64_t ch = t.channels[part];
    l.sx = ch;
    l.sy = g.width * ch;
    l.sz = g.height * l.sy;
    offset = b * g.depth * l.sz + c;
  } else {
    const int64_t ch = t.channels[part] / 8, p = c / ch, o = c % ch;
    const int64_t w2 = 2 * g.width, h2 = 2 * g.height, d2 = 2 * g.depth;
    l.sx = 2 * ch;
    l.sy = 2 * w2 * ch;
    l.sz = 2 * h2 * w2 * ch;
    offset = (((b * d2 + (p >> 2)) * h2 + ((p >> 1) & 1)) * w2 + (p & 1)) * ch + o;
  }
  l.data = t.data[part] + offset;
  l.mask = t.mask[part] ? t.mask[part] + offset : nullptr;
  return l;
}

INLINE vec read(const Locator& l, int64_t offset) {
  const vec v = load(l.data + offset);
  return l.mask ? (load(l.mask + offset) > 0.0f ? v : vec{}) : v;
}

// Transforms the input tiles first .. first + nt into v[xi][t][ci] (ci contiguous).
template <int K>
INLINE void input_tiles(const Tensor& in, const Geometry& g, int64_t first, int nt, float* v) {
  constexpr int A = Winograd<K>::kAlpha;
  const int64_t ci = in.total(), xi_stride = int64_t(nt) * ci;
  for (int64_t c = 0; c < ci; c += kLanes) {
    const TileOrigin o0 = tile_origin(g, first);
    Locator l = locate(in, g, o0.b, c);
    int64_t batch = o0.b;
    for (int t = 0; t < nt; ++t) {
      const TileOrigin o = tile_origin(g, first + t);
      if (o.b != batch) l = locate(in, g, batch = o.b, c);
      const int64_t z0 = o.z - g.pad[0], y0 = o.y - g.pad[1], x0 = o.x - g.pad[2];
      const int64_t corner = z0 * l.sz + y0 * l.sy + x0 * l.sx;
      const bool interior = z0 >= 0 && z0 + A <= g.depth && y0 >= 0 && y0 + A <= g.height &&
                            x0 >= 0 && x0 + A <= g.width;
      if (interior && t + 1 < nt && x0 + A + kTile <= g.width) {
        // The next tile's new columns while this one is transformed: its 36 rows lie far
        // apart and the hardware prefetcher does not follow them.
        for (int i = 0; i < A; ++i)
          for (int j = 0; j < A; ++j)
            for (int k = A; k < A + kTile; ++k)
              __builtin_prefetch(l.data + corner + i * l.sz + j * l.sy + k * l.sx);
      }
      float* out = v + int64_t(t) * ci + c;
      auto write = [&](int xi, vec value) { store(out + xi * xi_stride, value); };
      if (interior) {
        transform_3d<A, A, Winograd<K>::kInput>(
            [&](int i, int j, int k) { return read(l, corner + i * l.sz + j * l.sy + k * l.sx); },
            write);
      } else {
        transform_3d<A, A, Winograd<K>::kInput>(
            [&](int i, int j, int k) {
              const int64_t z = z0 + i, y = y0 + j, x = x0 + k;
              const bool inside = z >= 0 && z < g.depth && y >= 0 && y < g.height && x >= 0 &&
                                  x < g.width;
              return inside ? read(l, corner + i * l.sz + j * l.sy + k * l.sx) : vec{};
            },
            write);
      }
    }
  }
}

// The epilogue of a forward convolution: a bias (per channel as the output array stores it:
// for an up-sampled output, per channel c of p * C + c) and a ReLU.
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
};

// Transforms the products m[xi][t][0 .. cw) of output channels c0 .. c0 + cw back to the output
// tiles first .. first + nt and writes the voxels inside the output.
template <int K>
INLINE void output_tiles(const float* m, int64_t cw, int64_t c0, const Tensor& out,
                         const Epilogue& e, const Geometry& g, int64_t first, int nt) {
  constexpr int A = Winograd<K>::kAlpha;
  const int64_t xi_stride = int64_t(nt) * cw;
  for (int64_t c = 0; c < cw; c += kLanes) {
    int64_t batch = tile_origin(g, first).b;
    Locator l = locate(out, g, batch, c0 + c);
    vec bias = {};
    if (e.bias) {
      const int64_t stored = out.upsampled ? out.channels[0] / 8 : out.total();
      bias = load(e.bias + (c0 + c) % stored);
    }
    for (int t = 0; t < nt; ++t) {
      const TileOrigin o = tile_origin(g, first + t);
      if (o.b != batch) l = locate(out, g, batch = o.b, c0 + c);
      const bool interior =
          o.z + kTile <= g.depth && o.y + kTile <= g.height && o.x + kTile <= g.width;
      const float* in = m + int64_t(t) * cw + c;
      float* corner = l.data + o.z * l.sz + o.y * l.sy + o.x * l.sx;
      transform_3d<kTile, A, Winograd<K>::kOutput>(
          [&](int i, int j, int k) { return load(in + ((i * A + j) * A + k) * xi_stride); },
          [&](int index, vec value) {
            const int i = index / (kTile * kTile), j = index / kTile % kTile, k = index % kTile;
            if (interior || (o.z + i < g.depth && o.y + j < g.height && o.x + k < g.width)) {
              value += bias;
              if (e.relu) value = value > 0.0f ? value : vec{};
              store(corner + i * l.sz + j * l.sy + k * l.sx, value);
            }
          });
    }
  }
}

// The transposed output transform: dy of channels c0 .. c0 + cw on the tiles first .. first + nt
// (zero outside the output) into dm[xi][t][0 .. cw).
template <int K>
INLINE void output_grad_tiles(const Tensor& dy, int64_t c0, int64_t cw, const Geometry& g,
                              int64_t first, int nt, float* dm) {
  constexpr int A = Winograd<K>::kAlpha;
  const int64_t xi_stride = int64_t(nt) * cw;
  for (int64_t c = 0; c < cw; c += kLanes) {
    int64_t batch = tile_origin(g, first).b;
    Locator l = locate(dy, g, batch, c0 + c);
    for (int t = 0; t < nt; ++t) {
      const TileOrigin o = tile_origin(g, first + t);
      if (o.b != batch) l = locate(dy, g, batch = o.b, c0 + c);
      const int64_t corner = o.z * l.sz + o.y * l.sy + o.x * l.sx;
      float* out = dm + int64_t(t) * cw + c;
      transform_3d<A, kTile, Winograd<K>::kOutputT>(
          [&](int i, int j, int k) {
            const bool inside = o.z + i < g.depth && o.y + j < g.height && o.x + k < g.width;
            return inside ? read(l, corner + i * l.sz + j * l.sy + k * l.sx) : vec{};
          },
          [&](int xi, vec value) { store(out + xi * xi_stride, value); });
    }
  }
}

// out[r][:] (=, or += when ACCUMULATE) sum_k a[r * as + k * ak] b[k * bs + :] for R rows and NV
// vectors of columns: R * NV accumulators stay in registers over the whole k loop.
template <int R, int NV, bool ACCUMULATE>
INLINE void gemm_block(const float* a, int64_t as, int64_t ak, const float* b, int64_t bs,
                       float* out, int64_t os, int64_t k_size) {
  vec acc[R][NV] = {};
  for (int64_t k = 0; k < k_size; ++k) {
    vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * bs + v * kLanes);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const float s = a[r * as + k * ak];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * s;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      float* p = out + r * os + v * kLanes;
      store(p, ACCUMULATE ? load(p) + acc[r][v] : acc[r][v]);
    }
}

// Rows in blocks of R (about 24 accumulators for NV vectors), the rest in blocks of 4, 2 and 1
// (fewer instantiations than one block size per remainder).
template <int NV, bool ACCUMULATE, int R = (NV >= 4 ? 6 : NV == 3 ? 8 : 12)>
INLINE void gemm_rows(const float* a, int64_t as, int64_t ak, const float* b, int64_t bs,
                      float* out, int64_t os, int64_t rows, int64_t k_size) {
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    gemm_block<R, NV, ACCUMULATE>(a + r * as, as, ak, b, bs, out + r * os, os, k_size);
  for (; r + 4 <= rows; r += 4)
    gemm_block<4, NV, ACCUMULATE>(a + r * as, as, ak, b, bs, out + r * os, os, k_size);
  for (; r + 2 <= rows; r += 2)
    gemm_block<2, NV, ACCUMULATE>(a + r * as, as, ak, b, bs, out + r * os, os, k_size);
  for (; r < rows; ++r)
    gemm_block<1, NV, ACCUMULATE>(a + r * as, as, ak, b, bs, out + r * os, os, k_size);
}

// out (rows, cols; row stride os) = a (rows, k; strides as, ak) @ b (k, cols; row stride bs).
template <bool ACCUMULATE>
INLINE void gemm(const float* a, int64_t as, int64_t ak, const float* b, int64_t bs, float* out,
                 int64_t os, int64_t rows, int64_t k_size, int64_t cols) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= cols; c += 4 * kLanes)
    gemm_rows<4, ACCUMULATE>(a, as, ak, b + c, bs, out + c, os, rows, k_size);
  for (; c + 3 * kLanes <= cols; c += 3 * kLanes)
    gemm_rows<3, ACCUMULATE>(a, as, ak, b + c, bs, out + c, os, rows, k_size);
  for (; c + 2 * kLanes <= cols; c += 2 * kLanes)
    gemm_rows<2, ACCUMULATE>(a, as, ak, b + c, bs, out + c, os, rows, k_size);
  for (; c < cols; c += kLanes)
    gemm_rows<1, ACCUMULATE>(a, as, ak, b + c, bs, out + c, os, rows, k_size);
}

// Everything one call works on; `second` is the output (forward) or dy (weight gradient).
struct Problem {
  Geometry g;
  Tensor in, second;
  const float* u = nullptr;  // forward: U (alpha^3, ci, co)
  Epilogue epilogue;
  int64_t ci = 0, co = 0;
};

// A run of nt consecutive tiles in (batch, z, y, x) order.
struct Block {
  int64_t first;
  int nt;
};

// One block of the forward convolution: transform, then per chunk of output channels
// m[xi] = v[xi] @ u[xi] and the transform back.
template <int K>
INLINE void forward_block(const Problem& p, const Block& b, float* scratch) {
  constexpr int A3 = Winograd<K>::kAlpha * Winograd<K>::kAlpha * Winograd<K>::kAlpha;
  float* v = scratch;
  float* m = scratch + int64_t(A3) * b.nt * p.ci;
  input_tiles<K>(p.in, p.g, b.first, b.nt, v);
  for (int64_t c0 = 0; c0 < p.co; c0 += kChannelChunk) {
    const int64_t cw = std::min(kChannelChunk, p.co - c0);
    for (int xi = 0; xi < A3; ++xi)
      gemm<false>(v + int64_t(xi) * b.nt * p.ci, p.ci, 1, p.u + int64_t(xi) * p.ci * p.co + c0,
                  p.co, m + int64_t(xi) * b.nt * cw, cw, b.nt, p.ci, cw);
    output_tiles<K>(m, cw, c0, p.second, p.epilogue, p.g, b.first, b.nt);
  }
}

// One block of the weight gradient: du[xi] += v[xi]^T @ dm[xi], per chunk of output channels.
template <int K>
INLINE void weight_grad_block(const Problem& p, const Block& b, float* scratch, float* du) {
  constexpr int A3 = Winograd<K>::kAlpha * Winograd<K>::kAlpha * Winograd<K>::kAlpha;
  float* v = scratch;
  float* dm = scratch + int64_t(A3) * b.nt * p.ci;
  input_tiles<K>(p.in, p.g, b.first, b.nt, v);
  for (int64_t c0 = 0; c0 < p.co; c0 += kChannelChunk) {
    const int64_t cw = std::min(kChannelChunk, p.co - c0);
    output_grad_tiles<K>(p.second, c0, cw, p.g, b.first, b.nt, dm);
    for (int xi = 0; xi < A3; ++xi)
      gemm<true>(v + int64_t(xi) * b.nt * p.ci, 1, p.ci, dm + int64_t(xi) * b.nt * cw, cw,
                 du + int64_t(xi) * p.ci * p.co + c0, p.co, p.ci, b.nt, cw);
  }
}

// The compiled entry points, one per kernel size, each cloned for the CPU's vector width.
CLONES void forward_block_3(const Problem& p, const Block& b, float* s, float*) {
  forward_block<3>(p, b, s);
}
CLONES void forward_block_2(const Problem& p, const Block& b, float* s, float*) {
  forward_block<2>(p, b, s);
}
CLONES void weight_grad_block_3(const Problem& p, const Block& b, float* s, float* du) {
  weight_grad_block<3>(p, b, s, du);
}
CLONES void weight_grad_block_2(const Problem& p, const Block& b, float* s, float* du) {
  weight_grad_block<2>(p, b, s, du);
}
using BlockFn = void (*)(const Problem&, const Block&, float*, float*);

// Runs f(unit, worker) for unit in [0, n) on the caller and up to `workers - 1` tasks on XLA's
// pool; worker ids are below `workers`. XLA may run several of these calls at once on its pool
// threads, so the caller never waits for a task that has not started (that task could be queued
// behind the caller itself): it works until every unit is claimed, then waits only for tasks
// still running. A task that starts later finds no work and returns without touching f.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int workers, F&& f) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int active = 0, started = 1;  // the caller is worker 0
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &f](int id) {
    for (int64_t i; (i = state->next++) < n;) f(i, id);
  };
  for (int w = 1; w < workers; ++w)
    pool.Schedule([state, n, work] {
      int id;
      {
        std::lock_guard<std::mutex> lock(state->mu);
        if (state->next.load() >= n) return;
        id = state->started++;
        ++state->active;
      }
      work(id);
      std::lock_guard<std::mutex> lock(state->mu);
      --state->active;
      state->cv.notify_all();
    });
  work(0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->active == 0; });
}

// Runs `fn` over every block of tiles: runs of up to nt_max consecutive tiles whose transformed
// input and one chunk of products fill about kBlockBytes. `grads` (allocated here when
// `grad_size` > 0) receive weight-gradient sums, one per group of consecutive blocks: which
// worker runs a group changes from call to call, but not what the group adds up nor the order in
// which the caller adds the groups, so on one machine (the groups follow its thread count) the
// gradient is the same every time; with one sum per worker it was not, and the same seed did not
// give the same training run.
void for_each_block(ffi::ThreadPool& pool, const Problem& p, int alpha, BlockFn fn,
                    std::vector<AlignedFloats>& grads, size_t grad_size) {
  const int64_t a3 = int64_t(alpha) * alpha * alpha;
  const int64_t per_tile = a3 * (p.ci + std::min(p.co, kChannelChunk)) * int64_t(sizeof(float));
  const int64_t tiles = p.g.batch * p.g.tiles[0] * p.g.tiles[1] * p.g.tiles[2];
  const int nt_max = static_cast<int>(std::clamp<int64_t>(kBlockBytes / per_tile, 1, kMaxTiles));
  const int64_t units = (tiles + nt_max - 1) / nt_max;
  const int64_t groups =
      grad_size ? std::min(units, kGroupsPerThread * std::max<int64_t>(pool.num_threads(), 1))
                : units;
  const int workers =
      static_cast<int>(std::clamp<int64_t>(pool.num_threads(), 1, std::max<int64_t>(groups, 1)));
  std::vector<AlignedFloats> scratch(workers);
  grads.resize(grad_size ? groups : 0);
  parallel_for(pool, groups, workers, [&](int64_t group, int id) {
    auto& s = scratch[id];
    if (s.empty()) s.allocate(size_t(per_tile / sizeof(float)) * nt_max);
    if (grad_size) grads[group].allocate(grad_size);
    for (int64_t unit = group * units / groups; unit < (group + 1) * units / groups; ++unit) {
      const Block b{unit * nt_max,
                    static_cast<int>(std::min<int64_t>(nt_max, tiles - unit * nt_max))};
      fn(p, b, s.data(), grad_size ? grads[group].data() : nullptr);
    }
  });
}

ffi::Error invalid(const char* message) { return ffi::Error::InvalidArgument(message); }

// Reads the operand parts args[first .. first + parts) (and their masks after them when
// `masked`) into t; dims are the first part's.
ffi::Error read_tensor(ffi::RemainingArgs& args, size_t first, int parts, bool masked,
                       bool upsampled, Tensor& t, ffi::Span<const int64_t>& dims) {
  t.parts = parts;
  t.upsampled = upsampled;
  for (int i = 0; i < parts; ++i) {
    auto buffer = args.get<ffi::Buffer<ffi::F32>>(first + i);
    if (buffer.has_error()) return buffer.error();
    if (buffer->dimensions().size() != 5) return invalid("operands must be (B, D, H, W, C)");
    if (i == 0) dims = buffer->dimensions();
    t.data[i] = buffer->typed_data();
    if (buffer->dimensions()[4] % kLanes) return invalid("channel counts must be multiples of 16");
    t.channels[i] = buffer->dimensions()[4] * (upsampled ? 8 : 1);
    for (int a = 0; a < 4; ++a)
      if (buffer->dimensions()[a] != dims[a])
        return invalid("concatenated parts must share the batch and volume shape");
    if (masked) {
      auto mask = args.get<ffi::Buffer<ffi::F32>>(first + parts + i);
      if (mask.has_error()) return mask.error();
      if (mask->element_count() != buffer->element_count())
        return invalid("a mask must have the shape of its operand");
      t.mask[i] = mask->typed_data();
    }
  }
  return ffi::Error::Success();
}

ffi::Error make_geometry(ffi::Span<const int64_t> dims, bool upsampled,
                         ffi::Span<const int64_t> pad_lo, int64_t kernel_size, Geometry& g) {
  if (kernel_size != 2 && kernel_size != 3) return invalid("kernel_size must be 2 or 3");
  if (pad_lo.size() != 3) return invalid("pad_lo must have 3 entries");
  const int64_t f = upsampled ? 2 : 1;
  g.batch = dims[0];
  g.depth = dims[1] / f;
  g.height = dims[2] / f;
  g.width = dims[3] / f;
  for (int i = 0; i < 3; ++i) {
    if (dims[1 + i] % f) return invalid("an up-sampled operand must have even sizes");
    if (pad_lo[i] < 0 || pad_lo[i] >= kernel_size)
      return invalid("pad_lo must lie in [0, kernel_size)");
    g.pad[i] = pad_lo[i];
    g.tiles[i] = (dims[1 + i] / f + kTile - 1) / kTile;
  }
  return ffi::Error::Success();
}

bool same_grid(ffi::Span<const int64_t> dims, bool upsampled, const Geometry& g) {
  const int64_t f = upsampled ? 2 : 1;
  return dims.size() == 5 && dims[0] == g.batch && dims[1] == f * g.depth &&
         dims[2] == f * g.height && dims[3] == f * g.width;
}

// Arguments: inputs[inputs], their masks if masked, u (alpha^3, Ci, Co), bias (if has_bias).
// Results: outputs[outputs] splitting Co.
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       ffi::Span<const int64_t> pad_lo, int64_t kernel_size, int64_t inputs,
                       int64_t outputs, int64_t masked, int64_t upsampled_in,
                       int64_t upsampled_out, int64_t has_bias, int64_t relu) {
  if (inputs < 1 || inputs > 2 || outputs < 1 || outputs > 2) return invalid("1 or 2 parts");
  Problem p;
  ffi::Span<const int64_t> dims;
  if (auto e = read_tensor(args, 0, int(inputs), masked, upsampled_in, p.in, dims); e.failure())
    return e;
  if (auto e = make_geometry(dims, upsampled_in, pad_lo, kernel_size, p.g); e.failure()) return e;
  const size_t next = size_t(inputs) * (masked ? 2 : 1);
  auto u = args.get<ffi::Buffer<ffi::F32>>(next);
  if (u.has_error()) return u.error();
  const int alpha = kTile + int(kernel_size) - 1;
  const auto ud = u->dimensions();
  p.ci = p.in.total();
  if (ud.size() != 3 || ud[0] != int64_t(alpha) * alpha * alpha || ud[1] != p.ci)
    return invalid("u must be (alpha^3, Ci, Co)");
  p.co = ud[2];
  p.u = u->typed_data();
  p.second.parts = int(outputs);
  p.second.upsampled = upsampled_out;
  for (int i = 0; i < outputs; ++i) {
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (y.has_error()) return y.error();
    if (!same_grid((*y)->dimensions(), upsampled_out, p.g))
      return invalid("outputs must have the input's batch and volume shape");
    p.second.data[i] = (*y)->typed_data();
    if ((*y)->dimensions()[4] % kLanes) return invalid("channel counts must be multiples of 16");
    p.second.channels[i] = (*y)->dimensions()[4] * (upsampled_out ? 8 : 1);
  }
  if (p.second.total() != p.co) return invalid("the outputs' channels must add up to Co");
  if (has_bias) {
    auto bias = args.get<ffi::Buffer<ffi::F32>>(next + 1);
    if (bias.has_error()) return bias.error();
    if (outputs != 1 || bias->element_count() != size_t(p.co / (upsampled_out ? 8 : 1)))
      return invalid("a bias needs one output and one value per stored channel");
    p.epilogue.bias = bias->typed_data();
  }
  p.epilogue.relu = relu;
  std::vector<AlignedFloats> unused;
  for_each_block(pool, p, alpha, kernel_size == 3 ? forward_block_3 : forward_block_2, unused, 0);
  return ffi::Error::Success();
}

// Arguments: inputs[inputs], dy, its mask if masked. Result: dU (alpha^3, Ci, Co).
ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                          ffi::Result<ffi::Buffer<ffi::F32>> du, ffi::Span<const int64_t> pad_lo,
                          int64_t kernel_size, int64_t inputs, int64_t masked,
                          int64_t upsampled_dy) {
  if (inputs < 1 || inputs > 2) return invalid("1 or 2 input parts");
  Problem p;
  ffi::Span<const int64_t> dims, dy_dims;
  if (auto e = read_tensor(args, 0, int(inputs), false, false, p.in, dims); e.failure()) return e;
  if (auto e = make_geometry(dims, false, pad_lo, kernel_size, p.g); e.failure()) return e;
  if (auto e = read_tensor(args, size_t(inputs), 1, masked, upsampled_dy, p.second, dy_dims);
      e.failure())
    return e;
  if (!same_grid(dy_dims, upsampled_dy, p.g))
    return invalid("dy must have the input's batch and volume shape");
  p.ci = p.in.total();
  p.co = p.second.total();
  const int alpha = kTile + int(kernel_size) - 1;
  const size_t grad_size = size_t(alpha) * alpha * alpha * p.ci * p.co;
  if (du->element_count() != grad_size) return invalid("dU must be (alpha^3, Ci, Co)");
  std::vector<AlignedFloats> grads;
  for_each_block(pool, p, alpha, kernel_size == 3 ? weight_grad_block_3 : weight_grad_block_2,
                 grads, grad_size);
  float* out = du->typed_data();
  std::fill(out, out + grad_size, 0.0f);
  for (const auto& g : grads)
    for (size_t i = 0; i < g.size(); ++i) out[i] += g.data()[i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinogradForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("pad_lo")
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("inputs")
                                  .Attr<int64_t>("outputs")
                                  .Attr<int64_t>("masked")
                                  .Attr<int64_t>("upsampled_in")
                                  .Attr<int64_t>("upsampled_out")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WinogradWeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("pad_lo")
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("inputs")
                                  .Attr<int64_t>("masked")
                                  .Attr<int64_t>("upsampled_dy"));

namespace {

PyObject* registrations(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (!out) return nullptr;
  struct {
    const char* name;
    void* fn;
  } targets[] = {{"winograd_forward", reinterpret_cast<void*>(WinogradForward)},
                 {"winograd_weight_grad", reinterpret_cast<void*>(WinogradWeightGrad)}};
  for (auto& t : targets) {
    PyObject* capsule = PyCapsule_New(t.fn, nullptr, nullptr);
    if (!capsule || PyDict_SetItemString(out, t.name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return out;
}

PyMethodDef methods[] = {
    {"registrations", registrations, METH_NOARGS,
     "FFI handlers by target name, as PyCapsules for jax.ffi.register_ffi_target."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_winograd_cpu",
                      "Winograd 3D convolutions for XLA:CPU (FFI handlers).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__winograd_cpu() { return PyModule_Create(&module); }
