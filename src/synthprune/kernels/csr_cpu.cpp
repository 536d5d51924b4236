// synthprune's CPU kernels for the csr layer, and the dropout of SparseMLP and SparseCNN (see
// synthprune/csr_kernel.py, which builds and loads this file, and benchmarks/README.md for what
// they gain).
//
// Layout: activations are batch-minor, [n, B] row-major (the transposed view the csr layer
// passes between layers), so every connection touches B contiguous values. The kernels are
// bound by fetching those rows, not by arithmetic: they keep what they accumulate in
// registers, prefetch the rows of the connections ahead, and fuse the bias (forward) and the
// bias gradient (backward). Rows are split between threads with at::parallel_for; no
// two threads write the same output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// The register width the build targets: 64 bytes with AVX-512 (a batch of 128 floats is then
// one block of 8 registers, so each connection's row is fetched once per product, not twice),
// else 32 (AVX2, or two SSE/NEON registers).
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#else
constexpr int64_t kVectorBytes = 32;
#endif

// One register of T (GCC/Clang vector extensions), with unaligned loads.
template <typename T>
struct Reg {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t lanes = kVectorBytes / sizeof(T);
  static inline type load(const T* p) {
    type r;
    __builtin_memcpy(&r, p, sizeof r);
    return r;
  }
  static inline void store(T* p, type r) { __builtin_memcpy(p, &r, sizeof r); }
  static inline T sum(type r) {
    T s = 0;
    for (int64_t l = 0; l < lanes; ++l) s += r[l];
    return s;
  }
};

// Registers of accumulators per block of batch values in the products: 8 leaves room for the
// broadcast value and the loads among AVX2's 16.
constexpr int64_t kBlockRegs = 8;
// How many connections ahead the products prefetch their input rows. The rows are random
// (one per connection), so the hardware prefetcher cannot guess them; without this the
// forward product ran 5x slower (2.0 against 0.37 ms for 1000 -> 1000 at eps = 20, batch 128).
constexpr int64_t kPrefetchAhead = 4;

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// A 32-bit integer hash (Wellons' lowbias32): cheap, vectorisable, and good enough to decide
// which activations dropout keeps. U is uint32_t or a vector of them (the same operations, lane
// by lane), so the scalar and the vector masks are one formula.
template <typename U>
inline U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Whether dropout keeps the element at memory offset i: a pure function of (seed, i), shared by
// the dropout op and the fused layer below, so both draw the same mask.
inline bool keep(int64_t i, uint64_t seed, uint32_t threshold) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return mix32(mix32(static_cast<uint32_t>(i) ^ lo) ^ hi ^ static_cast<uint32_t>(i >> 32)) >= threshold;
}

// A vector of n values of type E.
template <typename E, int64_t n>
struct Lanes {
  typedef E type __attribute__((vector_size(n * sizeof(E))));
};

// out[t] = in[t] * scale where dropout keeps memory offset offset + t, else in[t] * 0 (in and out
// may be the same row), a register at a time: the hashes in 32-bit lanes, the factor chosen by
// a vector select. The scalar loop does not vectorise (the compiler leaves a branch per element,
// which the random mask mispredicts half the time: 2-6 ns per element).
template <typename T>
inline void dropout_row(const T* in, T* out, int64_t offset, int64_t batch, uint64_t seed, uint32_t threshold,
                        T scale) {
  using R = Reg<T>;
  using V = typename R::type;
  constexpr int64_t L = R::lanes;
  using U = typename Lanes<uint32_t, L>::type;  // the hashes
  using M = typename Lanes<typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type, L>::type;  // T's mask
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  U lane;
  for (int64_t l = 0; l < L; ++l) lane[l] = static_cast<uint32_t>(l);
  const V zero{}, factor = V{} + scale;
  int64_t t = 0;
  for (; t + L <= batch; t += L) {
    const int64_t i = offset + t;
    const uint32_t high = static_cast<uint32_t>(i >> 32);
    if (static_cast<uint32_t>((i + L - 1) >> 32) != high) break;  // a 2^32 boundary inside: scalar below
    const U h = mix32(mix32((lane + static_cast<uint32_t>(i)) ^ lo) ^ hi ^ high);  // keep()'s hash, lane by lane
    const M kept = __builtin_convertvector(h >= threshold, M);
    R::store(out + t, R::load(in + t) * (kept ? factor : zero));
  }
  for (; t < batch; ++t) out[t] = in[t] * (static_cast<T>(keep(offset + t, seed, threshold)) * scale);
}

// Sum of n values, in vector registers (four independent chains): a scalar sum is one chain of
// dependent adds, ~0.2 ms for a 1000 x 128 gradient's row sums against ~0.02 ms.
template <typename T>
inline T row_sum(const T* __restrict__ v, int64_t n) {
  using R = Reg<T>;
  constexpr int64_t L = R::lanes;
  typename R::type a{}, b{}, c{}, d{};
  int64_t t = 0;
  for (; t + 4 * L <= n; t += 4 * L) {
    a += R::load(v + t);
    b += R::load(v + t + L);
    c += R::load(v + t + 2 * L);
    d += R::load(v + t + 3 * L);
  }
  for (; t + L <= n; t += L) a += R::load(v + t);
  T s = R::sum((a + b) + (c + d));
  for (; t < n; ++t) s += v[t];
  return s;
}

// What the forward product does to each finished output row while it is still in L1: nothing,
// or ReLU and then (if dropout) dropout, as separate ReLU and dropout ops would, bit for bit,
// without two more passes over the activations.
template <typename T>
struct Epilogue {
  bool relu = false;
  bool dropout = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  T scale = 1;

  inline void apply(T* __restrict__ row, int64_t offset, int64_t batch) const {
    if (!relu) return;
    using R = Reg<T>;
    int64_t t = 0;
    for (; t + R::lanes <= batch; t += R::lanes) {  // a vector select (a scalar ?: may stay a branch)
      const typename R::type v = R::load(row + t);
      R::store(row + t, v < typename R::type{} ? typename R::type{} : v);  // NaN stays NaN, as in torch.relu
    }
    for (; t < batch; ++t) row[t] = row[t] < T(0) ? T(0) : row[t];
    if (dropout) dropout_row(row, row, offset, batch, seed, threshold, scale);
  }
};

// The dropout threshold of the hash for probability p (elements whose hash is below it drop).
inline uint32_t dropout_threshold(double p) {
  const double limit = p * 4294967296.0;
  return limit >= 4294967295.0 ? 4294967295U : static_cast<uint32_t>(limit);
}

// y[i, :] = bias[i] + sum over the row's connections k of values[perm[k]] * x[col[k], :].
// x: [n_in, batch], y: [n_rows, batch], both row-major (batch-minor).
template <typename T, typename I>
void spmm_kernel(const I* __restrict__ crow, const I* __restrict__ col, const T* __restrict__ values,
                 const I* __restrict__ perm, const T* __restrict__ x, const T* __restrict__ bias,
                 T* __restrict__ y, int64_t n_rows, int64_t batch, const Epilogue<T>& epilogue = {}) {
  using R = Reg<T>;
  constexpr int64_t W = kBlockRegs * R::lanes;  // batch values per block
  at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T start = bias ? bias[i] : T(0);
      const int64_t k0 = crow[i], k1 = crow[i + 1];
      T* __restrict__ out = y + i * batch;
      int64_t t0 = 0;
      for (; t0 + W <= batch; t0 += W) {
        typename R::type acc[kBlockRegs];
        for (int64_t r = 0; r < kBlockRegs; ++r) acc[r] = typename R::type{} + start;
        for (int64_t k = k0; k < k1; ++k) {
          if (k + kPrefetchAhead < k1)
            prefetch_bytes(x + static_cast<int64_t>(col[k + kPrefetchAhead]) * batch + t0, W * sizeof(T));
          const T v = values[perm ? perm[k] : k];
          const T* in = x + static_cast<int64_t>(col[k]) * batch + t0;
          for (int64_t r = 0; r < kBlockRegs; ++r) acc[r] += v * R::load(in + r * R::lanes);
        }
        for (int64_t r = 0; r < kBlockRegs; ++r) R::store(out + t0 + r * R::lanes, acc[r]);
      }
      // The last batch values, fewer than a block (all of them at small batches, e.g. batch 1
      // in inference): one register at a time, then one value at a time, each accumulated in
      // a register over the row's connections.
      for (; t0 + R::lanes <= batch; t0 += R::lanes) {
        typename R::type acc = typename R::type{} + start;
        for (int64_t k = k0; k < k1; ++k)
          acc += values[perm ? perm[k] : k] * R::load(x + static_cast<int64_t>(col[k]) * batch + t0);
        R::store(out + t0, acc);
      }
      for (; t0 < batch; ++t0) {
        T acc = start;
        for (int64_t k = k0; k < k1; ++k) acc += values[perm ? perm[k] : k] * x[static_cast<int64_t>(col[k]) * batch + t0];
        out[t0] = acc;
      }
      epilogue.apply(out, i * batch, batch);
    }
  });
}

// Sums of n partial-sum registers: sums[c] = the lanes of parts[c] added up. For float with
// AVX, eight at a time by horizontal adds (10 instructions for 8 sums instead of ~7 each).
template <typename T>
inline void reduce_lanes(const typename Reg<T>::type* parts, int64_t n, T* sums) {
  int64_t c = 0;
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    for (; c + 8 <= n; c += 8) {
      __m256 p[8];  // each register folded to 256 bits first where it is wider
      for (int64_t r = 0; r < 8; ++r) {
#if defined(__AVX512F__)
        const __m512 wide = reinterpret_cast<const __m512*>(parts + c)[r];
        p[r] = _mm256_add_ps(_mm512_castps512_ps256(wide),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide), 1)));
#else
        p[r] = reinterpret_cast<const __m256*>(parts + c)[r];
#endif
      }
      const __m256 h01 = _mm256_hadd_ps(p[0], p[1]), h23 = _mm256_hadd_ps(p[2], p[3]);
      const __m256 h45 = _mm256_hadd_ps(p[4], p[5]), h67 = _mm256_hadd_ps(p[6], p[7]);
      const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
      // lo = [s0 s1 s2 s3 | s0' s1' s2' s3'] (the two 128-bit halves' sums), hi likewise for 4..7
      _mm256_storeu_ps(sums + c, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20),
                                               _mm256_permute2f128_ps(lo, hi, 0x31)));
    }
  }
#endif
  for (; c < n; ++c) sums[c] = Reg<T>::sum(parts[c]);
}

// The backward of a layer in one pass over W's columns (the cached transpose: t_crow, t_col =
// the rows, t_perm = each connection's CSR position):
//   grad_x[j, :] = sum over column j's connections of values[k] * grad[row, :]   (if grad_x)
//   out[k]       = <grad[row, :], x[j, :]>
// Both read the same gradient row per connection, the only rows fetched from far away (the
// row x[j, :] stays in L1 while column j is worked on), so fusing them halves the backward's
// memory traffic against an input-gradient product followed by a separate SDDMM. Without
// grad_x (a first layer) it is the SDDMM alone, still column by column: x[j, :] is reused by
// every connection of the column, where a row-by-row SDDMM fetches a random x row for each
// (2.5x its limit against 1.5x for the whole fused backward, AVX-512, one thread). Threads
// split the columns: each writes its own rows of grad_x and its own connections of out.
template <typename T, typename I, bool WithInput>
void backward_kernel(const I* __restrict__ t_crow, const I* __restrict__ t_col, const I* __restrict__ t_perm,
                     const T* __restrict__ values, const T* __restrict__ grad, const T* __restrict__ x,
                     T* __restrict__ grad_x, T* __restrict__ out, int64_t n_cols, int64_t batch) {
  using R = Reg<T>;
  using V = typename R::type;
  constexpr int64_t W = kBlockRegs * R::lanes;  // batch values per block
  at::parallel_for(0, n_cols, 64, [&](int64_t begin, int64_t end) {
    // Per connection of the column, its dot product so far as a register of partial sums:
    // adding the lanes up once per connection, eight connections at a time, instead of once
    // per block and connection (that reduction was 40% of the kernel's time).
    std::vector<V> partial;
    std::vector<T> sums;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k0 = t_crow[j], k1 = t_crow[j + 1];
      const T* __restrict__ xj = x + j * batch;
      T* __restrict__ gx = WithInput ? grad_x + j * batch : nullptr;
      partial.assign(k1 - k0, V{});
      int64_t t0 = 0;
      for (; t0 + W <= batch; t0 += W) {
        V acc[kBlockRegs] = {};
        // x[j]'s block in registers for the whole column, loaded once: left to the compiler it
        // was reloaded for every connection (11% of the kernel, AVX-512 and AVX2 alike).
        V xr[kBlockRegs];
        for (int64_t r = 0; r < kBlockRegs; ++r) xr[r] = R::load(xj + t0 + r * R::lanes);
        for (int64_t k = k0; k < k1; ++k) {
          if (k + kPrefetchAhead < k1)
            prefetch_bytes(grad + static_cast<int64_t>(t_col[k + kPrefetchAhead]) * batch + t0, W * sizeof(T));
          const T v = WithInput ? values[t_perm[k]] : T(0);
          const T* g = grad + static_cast<int64_t>(t_col[k]) * batch + t0;
          V d0{}, d1{};
          for (int64_t r = 0; r < kBlockRegs; r += 2) {
            const V g0 = R::load(g + r * R::lanes), g1 = R::load(g + (r + 1) * R::lanes);
            if constexpr (WithInput) {
              acc[r] += v * g0;
              acc[r + 1] += v * g1;
            }
            d0 += g0 * xr[r];
            d1 += g1 * xr[r + 1];
          }
          partial[k - k0] += d0 + d1;
        }
        if constexpr (WithInput)
          for (int64_t r = 0; r < kBlockRegs; ++r) R::store(gx + t0 + r * R::lanes, acc[r]);
      }
      sums.resize(k1 - k0);
      reduce_lanes<T>(partial.data(), k1 - k0, sums.data());
      for (int64_t k = k0; k < k1; ++k) out[t_perm[k]] = sums[k - k0];
      for (; t0 < batch; ++t0) {  // the last batch values, fewer than a block: one at a time
        T acc = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t at = t_perm[k];
          const T g = grad[static_cast<int64_t>(t_col[k]) * batch + t0];
          if constexpr (WithInput) acc += values[at] * g;
          out[at] += g * xj[t0];
        }
        if constexpr (WithInput) gx[t0] = acc;
      }
    }
  });
}

// out [n, batch] = x [batch, n] transposed: the network's input into the batch-minor layout.
// 8 x 8 tiles of floats go through registers (AVX: unpack, shuffle and lane permutes); a
// strided copy touches a new cache line per element and took 42-66 us of a ~2 ms step for
// 128 x 784 floats, this 12 us.
template <typename T>
void transpose_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t batch, int64_t n) {
  constexpr int64_t kTile = 8;
  at::parallel_for(0, (n + kTile - 1) / kTile, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j0 = begin * kTile; j0 < std::min(n, end * kTile); j0 += kTile) {
      int64_t b0 = 0;
#if defined(__AVX__)
      if constexpr (std::is_same_v<T, float>) {
        for (; j0 + kTile <= n && b0 + kTile <= batch; b0 += kTile) {
          __m256 r[8], u[8], v[8];
          for (int64_t k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(x + (b0 + k) * n + j0);
          for (int64_t k = 0; k < 8; k += 2) {
            u[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
            u[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
          }
          for (int64_t k = 0; k < 8; k += 4) {
            v[k] = _mm256_shuffle_ps(u[k], u[k + 2], 0x44);
            v[k + 1] = _mm256_shuffle_ps(u[k], u[k + 2], 0xEE);
            v[k + 2] = _mm256_shuffle_ps(u[k + 1], u[k + 3], 0x44);
            v[k + 3] = _mm256_shuffle_ps(u[k + 1], u[k + 3], 0xEE);
          }
          for (int64_t k = 0; k < 4; ++k) {
            _mm256_storeu_ps(out + (j0 + k) * batch + b0, _mm256_permute2f128_ps(v[k], v[k + 4], 0x20));
            _mm256_storeu_ps(out + (j0 + k + 4) * batch + b0, _mm256_permute2f128_ps(v[k], v[k + 4], 0x31));
          }
        }
      }
#endif
      const int64_t j1 = std::min(n, j0 + kTile);
      for (int64_t b = b0; b < batch; ++b)  // what the tiles left (the batch's last rows, other dtypes)
        for (int64_t j = j0; j < j1; ++j) out[j * batch + b] = x[b * n + j];
    }
  });
}

template <typename T>
void row_sums(const T* __restrict__ grad, T* __restrict__ sums, int64_t n_rows, int64_t batch) {
  at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sums[i] = row_sum(grad + i * batch, batch);
  });
}

// y[i] = x[i] * scale where hash(i, seed) >= threshold, else 0; i is the offset in memory, so
// x and y share their strides. The mask is a pure function of (seed, i): the backward pass
// recomputes it instead of storing it, and the result does not depend on the thread count.
template <typename T>
void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, uint64_t seed, uint32_t threshold,
                    T scale) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    dropout_row(x + begin, y + begin, begin, end - begin, seed, threshold, scale);
  });
}

// The backward of ReLU and dropout after a layer, from the layer's output y (after both):
// grad_z = grad * scale where y > 0, else 0 -- y > 0 exactly where dropout kept the element
// and the ReLU passed it, and the gradient through both is then the dropout's scale. The
// bias gradient (row sums of grad_z) is summed in the same pass.
template <typename T>
void relu_dropout_backward_kernel(const T* __restrict__ grad, const T* __restrict__ y, T* __restrict__ grad_z,
                                  T* __restrict__ bias_grad, int64_t n_rows, int64_t batch, T scale) {
  at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* __restrict__ g = grad + i * batch;
      const T* __restrict__ yr = y + i * batch;
      T* __restrict__ out = grad_z + i * batch;
      using R = Reg<T>;
      const typename R::type zero{};
      int64_t t = 0;
      for (; t + R::lanes <= batch; t += R::lanes)  // a vector select: the ReLU's signs are random
        R::store(out + t, R::load(yr + t) > zero ? R::load(g + t) * scale : zero);
      for (; t < batch; ++t) out[t] = yr[t] > T(0) ? g[t] * scale : T(0);
      if (bias_grad) bias_grad[i] = row_sum(out, batch);
    }
  });
}

// The narrow dense layer that ends a network of csr layers (the reference MLP's 1000 -> 10
// output layer), on the batch-minor input x_t [n_in, B] the csr layers pass on. With one side
// only 10 wide, MKL's GEMM ran these products at ~15% of its rate (83-91 us each at batch 128,
// 0.25 ms of a ~2 ms step); here each is a few register blocks over rows that stay in L1/L2.
// At most this many outputs per register block of the forward and of the weight gradient.
constexpr int64_t kNarrowBlock = 8;

// Calls body(std::integral_constant<int64_t, K>{}) with K the block size that splits n outputs
// into the fewest blocks of at most kNarrowBlock, as evenly as they go (10 -> 5 + 5, not 8 + 2:
// a block is always computed whole, so 8 + 2 would load and multiply 16 rows for 10).
template <typename F>
void with_narrow_block(int64_t n, F&& body) {
  const int64_t blocks = std::max<int64_t>(1, (n + kNarrowBlock - 1) / kNarrowBlock);
  switch ((n + blocks - 1) / blocks) {
    case 1: body(std::integral_constant<int64_t, 1>{}); break;
    case 2: body(std::integral_constant<int64_t, 2>{}); break;
    case 3: body(std::integral_constant<int64_t, 3>{}); break;
    case 4: body(std::integral_constant<int64_t, 4>{}); break;
    case 5: body(std::integral_constant<int64_t, 5>{}); break;
    case 6: body(std::integral_constant<int64_t, 6>{}); break;
    case 7: body(std::integral_constant<int64_t, 7>{}); break;
    default: body(std::integral_constant<int64_t, kNarrowBlock>{});
  }
}

// y [B, n_out] (row-major, the layout the loss reads fastest) = x W^T + bias, W [n_out, n_in].
template <typename T>
void narrow_forward_kernel(const T* __restrict__ w, const T* __restrict__ x, const T* __restrict__ bias,
                           T* __restrict__ y, int64_t n_out, int64_t n_in, int64_t batch) {
  using R = Reg<T>;
  constexpr int64_t L = R::lanes;
  with_narrow_block(n_out, [&](auto size) {
    constexpr int64_t K = decltype(size)::value;
    at::parallel_for(0, batch / L, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t t0 = c * L;
        for (int64_t o0 = 0; o0 < n_out; o0 += K) {
          const int64_t block = std::min(K, n_out - o0);
          // A whole block of rows always: past the last output the last row is repeated, and
          // those sums are dropped (a fixed block size keeps the accumulators in registers).
          const T* rows[K];
          typename R::type acc[K];
          for (int64_t j = 0; j < K; ++j) {
            const int64_t o = std::min(o0 + j, n_out - 1);
            rows[j] = w + o * n_in;
            acc[j] = typename R::type{} + (bias ? bias[o] : T(0));
          }
          for (int64_t i = 0; i < n_in; ++i) {
            const typename R::type in = R::load(x + i * batch + t0);
            for (int64_t j = 0; j < K; ++j) acc[j] += rows[j][i] * in;
          }
          for (int64_t j = 0; j < block; ++j)
            for (int64_t l = 0; l < L; ++l) y[(t0 + l) * n_out + o0 + j] = acc[j][l];
        }
      }
    });
  });
  for (int64_t t = batch / L * L; t < batch; ++t)  // the last batch % L samples, a value at a time
    for (int64_t o = 0; o < n_out; ++o) {
      T acc = bias ? bias[o] : T(0);
      for (int64_t i = 0; i < n_in; ++i) acc += w[o * n_in + i] * x[i * batch + t];
      y[t * n_out + o] = acc;
    }
}

// The backward of narrow_forward_kernel, from g [B, n_out] (row-major) and g_t, its transpose
// [n_out, B]:
//   grad_x [n_in, B] = (g W)^T, batch-minor as the csr layer before wants it   (if grad_x)
//   grad_w [n_out, n_in] = g^T x                                               (if grad_w)
// Both in one pass over the inputs; g_t (n_out rows) stays in L1 throughout.
template <typename T>
void narrow_backward_kernel(const T* __restrict__ w, const T* __restrict__ g_t, const T* __restrict__ x,
                            T* __restrict__ grad_x, T* __restrict__ grad_w, int64_t n_out, int64_t n_in,
                            int64_t batch) {
  using R = Reg<T>;
  constexpr int64_t L = R::lanes, W = kBlockRegs * L;
  at::parallel_for(0, n_in, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; grad_x && i < end; ++i) {  // grad_x[i, :] = sum over outputs o of w[o, i] * g_t[o, :]
      T* __restrict__ out = grad_x + i * batch;
      int64_t t0 = 0;
      for (; t0 + W <= batch; t0 += W) {
        typename R::type acc[kBlockRegs] = {};
        for (int64_t o = 0; o < n_out; ++o) {
          const T v = w[o * n_in + i];
          for (int64_t r = 0; r < kBlockRegs; ++r) acc[r] += v * R::load(g_t + o * batch + t0 + r * L);
        }
        for (int64_t r = 0; r < kBlockRegs; ++r) R::store(out + t0 + r * L, acc[r]);
      }
      for (; t0 + L <= batch; t0 += L) {
        typename R::type acc{};
        for (int64_t o = 0; o < n_out; ++o) acc += w[o * n_in + i] * R::load(g_t + o * batch + t0);
        R::store(out + t0, acc);
      }
      for (; t0 < batch; ++t0) {
        T acc = 0;
        for (int64_t o = 0; o < n_out; ++o) acc += w[o * n_in + i] * g_t[o * batch + t0];
        out[t0] = acc;
      }
    }
    // grad_w[o, i] = <g_t[o, :], x[i, :]>: a block of outputs at a time (a whole block, the
    // last row repeated, as in the forward), the inputs inside it, so the block's row pointers
    // are set up once, not per input (with 8 registers per row that set-up cost more than the sums).
    if (grad_w) with_narrow_block(n_out, [&](auto size) {
      constexpr int64_t K = decltype(size)::value;
      const int64_t vector_end = batch / L * L;
      for (int64_t o0 = 0; o0 < n_out; o0 += K) {
        const int64_t block = std::min(K, n_out - o0);
        const T* rows[K];
        for (int64_t j = 0; j < K; ++j) rows[j] = g_t + std::min(o0 + j, n_out - 1) * batch;
        for (int64_t i = begin; i < end; ++i) {
          const T* __restrict__ xr = x + i * batch;
          // kNarrowBlock partial sums whatever K, so that reduce_lanes takes its 8-at-a-time path
          typename R::type parts[kNarrowBlock] = {};
          for (int64_t t = 0; t < vector_end; t += L) {
            const typename R::type in = R::load(xr + t);
            for (int64_t j = 0; j < K; ++j) parts[j] += R::load(rows[j] + t) * in;
          }
          T sums[kNarrowBlock];
          reduce_lanes<T>(parts, kNarrowBlock, sums);
          for (int64_t j = 0; j < block; ++j) {
            T s = sums[j];
            for (int64_t t = vector_end; t < batch; ++t) s += rows[j][t] * xr[t];
            grad_w[(o0 + j) * n_in + i] = s;
          }
        }
      }
    });
  });
}

void check_index(const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK(crow.dim() == 1 && col.dim() == 1 && crow.is_contiguous() && col.is_contiguous(),
              "csr indices must be contiguous vectors");
  TORCH_CHECK(crow.scalar_type() == col.scalar_type() &&
                  (crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong),
              "csr indices must both be int32 or both int64");
}

void check_dense(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == like.scalar_type() && t.is_cpu(),
              name, " must be a contiguous 2-D CPU tensor of the values' dtype");
}

template <typename F>
void dispatch_index(const at::Tensor& crow, F&& body) {
  if (crow.scalar_type() == at::kInt) body(int32_t{});
  else body(int64_t{});
}

}  // namespace

// y_t [n_rows, B] = W x_t (+ bias), W in CSR: row pointers crow, columns col and
// values[perm[k]] (values[k] without perm, which lets the transpose reuse the values).
at::Tensor csr_spmm(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                    const c10::optional<at::Tensor>& perm, const at::Tensor& x_t,
                    const c10::optional<at::Tensor>& bias) {
  check_index(crow, col);
  check_dense(x_t, values, "x_t");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(!perm || (perm->scalar_type() == crow.scalar_type() && perm->is_contiguous()),
              "perm must be contiguous, of the indices' dtype");
  TORCH_CHECK(!bias || (bias->scalar_type() == values.scalar_type() && bias->is_contiguous()),
              "bias must be contiguous, of the values' dtype");
  const int64_t n_rows = crow.size(0) - 1, batch = x_t.size(1);
  auto y = at::empty({n_rows, batch}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_spmm", [&] {
    dispatch_index(crow, [&](auto index) {
      using I = decltype(index);
      spmm_kernel<scalar_t, I>(crow.data_ptr<I>(), col.data_ptr<I>(), values.data_ptr<scalar_t>(),
                               perm ? perm->data_ptr<I>() : nullptr, x_t.data_ptr<scalar_t>(),
                               bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), n_rows,
                               batch);
    });
  });
  return y;
}

// y_t = dropout(relu(W x_t + bias)) (no dropout for p = 0): the csr layer with the ReLU and the
// dropout after it, in one pass. The dropout mask is the dropout op's for the same seed.
at::Tensor csr_spmm_relu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                         const at::Tensor& x_t, const c10::optional<at::Tensor>& bias, double p, int64_t seed) {
  check_index(crow, col);
  check_dense(x_t, values, "x_t");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(!bias || (bias->scalar_type() == values.scalar_type() && bias->is_contiguous()),
              "bias must be contiguous, of the values' dtype");
  TORCH_CHECK(p >= 0 && p < 1, "dropout probability must be in [0, 1)");
  const int64_t n_rows = crow.size(0) - 1, batch = x_t.size(1);
  auto y = at::empty({n_rows, batch}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_spmm_relu", [&] {
    Epilogue<scalar_t> epilogue;
    epilogue.relu = true;
    epilogue.seed = static_cast<uint64_t>(seed);
    epilogue.dropout = p > 0;
    epilogue.threshold = dropout_threshold(p);
    epilogue.scale = static_cast<scalar_t>(1.0 / (1.0 - p));
    dispatch_index(crow, [&](auto index) {
      using I = decltype(index);
      spmm_kernel<scalar_t, I>(crow.data_ptr<I>(), col.data_ptr<I>(), values.data_ptr<scalar_t>(), nullptr,
                               x_t.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
                               y.data_ptr<scalar_t>(), n_rows, batch, epilogue);
    });
  });
  return y;
}

// (grad_z [n, B], bias gradient [n] or empty): the gradient before the ReLU and dropout of
// csr_spmm_relu, from the gradient after them and that op's output y_t.
std::tuple<at::Tensor, at::Tensor> relu_dropout_backward(const at::Tensor& grad_t, const at::Tensor& y_t, double p,
                                                         bool with_bias) {
  check_dense(grad_t, y_t, "grad_t");
  check_dense(y_t, grad_t, "y_t");
  TORCH_CHECK(grad_t.sizes() == y_t.sizes(), "grad_t and y_t must have the same shape");
  TORCH_CHECK(p >= 0 && p < 1, "dropout probability must be in [0, 1)");
  auto grad_z = at::empty_like(grad_t);
  auto bias_grad = at::empty({with_bias ? grad_t.size(0) : 0}, grad_t.options());
  AT_DISPATCH_FLOATING_TYPES(grad_t.scalar_type(), "relu_dropout_backward", [&] {
    relu_dropout_backward_kernel<scalar_t>(grad_t.data_ptr<scalar_t>(), y_t.data_ptr<scalar_t>(),
                                           grad_z.data_ptr<scalar_t>(),
                                           with_bias ? bias_grad.data_ptr<scalar_t>() : nullptr, grad_t.size(0),
                                           grad_t.size(1), static_cast<scalar_t>(1.0 / (1.0 - p)));
  });
  return {grad_z, bias_grad};
}

// (input gradient [n_in, B] or empty, value gradient [nnz], bias gradient [n_out] or empty):
// the fused backward, given W's transpose (t_crow, t_col, t_perm) and the forward's x_t. The
// input gradient is computed when with_input is true, the bias gradient when with_bias is.
std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_backward(const at::Tensor& t_crow, const at::Tensor& t_col,
                                                            const at::Tensor& t_perm, const at::Tensor& values,
                                                            const at::Tensor& grad_t, const at::Tensor& x_t,
                                                            bool with_bias, bool with_input) {
  check_index(t_crow, t_col);
  check_dense(grad_t, x_t, "grad_t");
  check_dense(x_t, grad_t, "x_t");
  TORCH_CHECK(values.is_contiguous() && values.scalar_type() == x_t.scalar_type(),
              "values must be contiguous, of x_t's dtype");
  TORCH_CHECK(t_perm.scalar_type() == t_crow.scalar_type() && t_perm.is_contiguous(),
              "t_perm must be contiguous, of the indices' dtype");
  TORCH_CHECK(grad_t.size(1) == x_t.size(1), "grad_t and x_t must have the same batch");
  const int64_t n_cols = t_crow.size(0) - 1, batch = x_t.size(1);
  TORCH_CHECK(x_t.size(0) == n_cols, "x_t must have one row per input");
  auto grad_x = with_input ? at::empty({n_cols, batch}, x_t.options()) : at::empty({0, batch}, x_t.options());
  auto out = at::empty({values.size(0)}, x_t.options());
  auto bias_grad = at::empty({with_bias ? grad_t.size(0) : 0}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "csr_backward", [&] {
    if (with_bias) row_sums<scalar_t>(grad_t.data_ptr<scalar_t>(), bias_grad.data_ptr<scalar_t>(), grad_t.size(0), batch);
    dispatch_index(t_crow, [&](auto index) {
      using I = decltype(index);
      auto run = [&](auto kernel) {
        kernel(t_crow.data_ptr<I>(), t_col.data_ptr<I>(), t_perm.data_ptr<I>(), values.data_ptr<scalar_t>(),
               grad_t.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(), with_input ? grad_x.data_ptr<scalar_t>() : nullptr,
               out.data_ptr<scalar_t>(), n_cols, batch);
      };
      if (with_input) run(backward_kernel<scalar_t, I, true>);
      else run(backward_kernel<scalar_t, I, false>);
    });
  });
  return {grad_x, out, bias_grad};
}

// x [B, n] (contiguous) as a contiguous [n, B]: x.t().contiguous(), faster.
at::Tensor batch_minor(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.is_cpu(), "batch_minor needs a contiguous 2-D CPU tensor");
  auto out = at::empty({x.size(1), x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_minor", [&] {
    transpose_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return out;
}

// Dropout with probability p of every element of x (dense in memory, any strides): the output
// has x's strides; applied to the output's gradient with the same seed it is the backward.
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.is_cpu() && x.is_non_overlapping_and_dense(), "dropout needs a CPU tensor dense in memory");
  TORCH_CHECK(p > 0 && p < 1, "dropout probability must be in (0, 1)");
  auto y = at::empty_like(x);  // same strides: a dense tensor keeps its memory layout
  TORCH_CHECK(y.strides() == x.strides(), "dropout output must share the input's strides");
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout", [&] {
    dropout_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), static_cast<uint64_t>(seed),
                             threshold, static_cast<scalar_t>(1.0 / (1.0 - p)));
  });
  return y;
}

// y [B, n_out] = x W^T (+ bias) for a narrow dense layer, from x_t [n_in, B]: see
// narrow_forward_kernel.
at::Tensor narrow_linear(const at::Tensor& weight, const at::Tensor& x_t, const c10::optional<at::Tensor>& bias) {
  check_dense(weight, x_t, "weight");
  check_dense(x_t, weight, "x_t");
  TORCH_CHECK(weight.size(1) == x_t.size(0), "weight must have one column per row of x_t");
  TORCH_CHECK(!bias || (bias->scalar_type() == weight.scalar_type() && bias->is_contiguous() &&
                        bias->numel() == weight.size(0)),
              "bias must be contiguous, one value per output, of the weight's dtype");
  const int64_t n_out = weight.size(0), n_in = weight.size(1), batch = x_t.size(1);
  auto y = at::empty({batch, n_out}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "narrow_linear", [&] {
    narrow_forward_kernel<scalar_t>(weight.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(),
                                    bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), n_out, n_in,
                                    batch);
  });
  return y;
}

// (input gradient [n_in, B] or empty, weight gradient [n_out, n_in] or empty, bias gradient
// [n_out] or empty) of narrow_linear, from the output's gradient grad [B, n_out].
std::tuple<at::Tensor, at::Tensor, at::Tensor> narrow_linear_backward(const at::Tensor& weight, const at::Tensor& grad,
                                                                      const at::Tensor& x_t, bool with_input,
                                                                      bool with_weight, bool with_bias) {
  check_dense(weight, x_t, "weight");
  check_dense(x_t, weight, "x_t");
  check_dense(grad, weight, "grad");
  const int64_t n_out = weight.size(0), n_in = weight.size(1), batch = x_t.size(1);
  TORCH_CHECK(x_t.size(0) == n_in && grad.size(0) == batch && grad.size(1) == n_out,
              "grad must be [batch, n_out] and x_t [n_in, batch] for this weight");
  auto grad_t = grad.t().contiguous();  // [n_out, B]: n_out x B values, a few kB
  auto grad_x = at::empty({with_input ? n_in : 0, batch}, x_t.options());
  auto grad_w = at::empty({with_weight ? n_out : 0, n_in}, x_t.options());
  auto grad_b = at::empty({with_bias ? n_out : 0}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "narrow_linear_backward", [&] {
    const scalar_t* g_t = grad_t.data_ptr<scalar_t>();
    if (with_bias) row_sums<scalar_t>(g_t, grad_b.data_ptr<scalar_t>(), n_out, batch);
    if (with_input || with_weight)
      narrow_backward_kernel<scalar_t>(weight.data_ptr<scalar_t>(), g_t, x_t.data_ptr<scalar_t>(),
                                       with_input ? grad_x.data_ptr<scalar_t>() : nullptr,
                                       with_weight ? grad_w.data_ptr<scalar_t>() : nullptr, n_out, n_in, batch);
  });
  return {grad_x, grad_w, grad_b};
}

TORCH_LIBRARY(synthprune, m) {
  m.def("csr_spmm(Tensor crow, Tensor col, Tensor values, Tensor? perm, Tensor x_t, Tensor? bias) -> Tensor");
  m.def("csr_backward(Tensor t_crow, Tensor t_col, Tensor t_perm, Tensor values, Tensor grad_t, Tensor x_t, "
        "bool with_bias, bool with_input=True) -> (Tensor, Tensor, Tensor)");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("batch_minor(Tensor x) -> Tensor");
  m.def("csr_spmm_relu(Tensor crow, Tensor col, Tensor values, Tensor x_t, Tensor? bias, float p, int seed) -> Tensor");
  m.def("relu_dropout_backward(Tensor grad_t, Tensor y_t, float p, bool with_bias) -> (Tensor, Tensor)");
  m.def("narrow_linear(Tensor weight, Tensor x_t, Tensor? bias) -> Tensor");
  m.def("narrow_linear_backward(Tensor weight, Tensor grad, Tensor x_t, bool with_input, bool with_weight, "
        "bool with_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(synthprune, CPU, m) {
  m.impl("csr_spmm", &csr_spmm);
  m.impl("csr_backward", &csr_backward);
  m.impl("dropout", &dropout);
  m.impl("batch_minor", &batch_minor);
  m.impl("csr_spmm_relu", &csr_spmm_relu);
  m.impl("relu_dropout_backward", &relu_dropout_backward);
  m.impl("narrow_linear", &narrow_linear);
  m.impl("narrow_linear_backward", &narrow_linear_backward);
}
