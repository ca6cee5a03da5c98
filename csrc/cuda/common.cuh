// Shared device code of the CUDA kernels: the tensor table, the per-block
// (tensor, chunk) walk with 16-byte vector loads, dtype dispatch, scalar
// reads, block reductions and the launch check.
//
// Why a table in device memory: PyTorch's multi_tensor_apply passes the
// tensor list as a kernel argument (4 KB), so a step over hundreds of tensors
// needs several launches. Here the list lives in a device buffer built once
// by fastsgd/kernels/cuda.py and reused while the parameter set is
// unchanged, so one launch covers any number of tensors.
#pragma once

#if __cplusplus < 201703L
#error "fastsgd CUDA kernels need C++17 (nvcc -std=c++17)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/ops.h"

namespace fastsgd {
namespace cuda {

constexpr int kThreads = 256;  // threads per block for every kernel here

// ---------------------------------------------------------------------------
// Table layout (must match build_host_table in fastsgd/kernels/cuda.py).
// int64 words; for each tensor t, kEntryWords words at t * kEntryWords:
//   0 param ptr   1 grad ptr   2 state0 ptr (momentum buffer / exp_avg)
//   3 state1 ptr (exp_avg_sq)  4 step ptr (LAMB, float32 0-dim)
//   5 numel       6 row_len (elements per stacked-trial row; >= 1)
//   7 flags: bits [0,32) index of the tensor's first block, [32,40) kind,
//            bit 40 first_step, bit 41 vectorised (all pointers 16-byte aligned)
// then, at n_tensors * kEntryWords, one word per block: tensor << 32 | chunk.
// Blocks of one tensor are consecutive, so segmented reductions can find
// their partials from the first block index and the chunk count.
// ---------------------------------------------------------------------------
constexpr int kEntryWords = 8;

struct Entry {
  char* ptr[5];
  int64_t numel;
  int64_t row_len;
  int64_t first_block;
  int kind;
  bool first_step;
  bool vectorised;
};

__device__ __forceinline__ Entry load_entry(const int64_t* table, int64_t t) {
  const int64_t* w = table + t * kEntryWords;
  Entry e;
#pragma unroll
  for (int k = 0; k < 5; ++k) e.ptr[k] = reinterpret_cast<char*>(w[k]);
  e.numel = w[5];
  e.row_len = w[6];
  const uint64_t flags = static_cast<uint64_t>(w[7]);
  e.first_block = static_cast<int64_t>(flags & 0xffffffffull);
  e.kind = static_cast<int>((flags >> 32) & 0xff);
  e.first_step = (flags >> 40) & 1;
  e.vectorised = (flags >> 41) & 1;
  return e;
}

__device__ __forceinline__ int64_t n_chunks(int64_t numel, int64_t chunk_size) {
  return (numel + chunk_size - 1) / chunk_size;
}

// The work of one CUDA block: elements [begin, end) of one tensor.
struct Chunk {
  int64_t tensor;
  Entry e;
  int64_t begin, end;
};

__device__ __forceinline__ Chunk this_chunk(const TableArg& tab) {
  const uint64_t w = static_cast<uint64_t>(tab.table[tab.n_tensors * kEntryWords + blockIdx.x]);
  Chunk c;
  c.tensor = static_cast<int64_t>(w >> 32);
  c.e = load_entry(tab.table, c.tensor);
  c.begin = static_cast<int64_t>(w & 0xffffffffull) * tab.chunk_size;
  c.end = c.begin + tab.chunk_size < c.e.numel ? c.begin + tab.chunk_size : c.e.numel;
  return c;
}

// ---------------------------------------------------------------------------
// Dtype combinations. A kind is (param/grad dtype, state dtype); math runs in
// acc_t: float for fp32/fp16/bf16, double for fp64. The codes must match
// _KINDS in fastsgd/kernels/cuda.py.
// ---------------------------------------------------------------------------
template <typename P, typename S>
struct Kind {
  using param_t = P;
  using state_t = S;
  using acc_t = std::conditional_t<std::is_same<P, double>::value, double, float>;
  static constexpr int kVec = 16 / sizeof(P);  // elements per 16-byte param load
};

template <class F>
__device__ __forceinline__ void dispatch_kind(int kind, F&& f) {
  switch (kind) {
    case 0: f(Kind<float, float>{}); break;
    case 1: f(Kind<float, __nv_bfloat16>{}); break;
    case 2: f(Kind<float, __half>{}); break;
    case 3: f(Kind<__half, __half>{}); break;
    case 4: f(Kind<__half, float>{}); break;
    case 5: f(Kind<__nv_bfloat16, __nv_bfloat16>{}); break;
    case 6: f(Kind<__nv_bfloat16, float>{}); break;
    case 7: f(Kind<double, double>{}); break;
    default: break;  // validated in Python
  }
}

// ---- conversions ----------------------------------------------------------
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename A>
__device__ __forceinline__ T narrow(A x) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

// Counter-based hash (splitmix64 finaliser): independent random bits per
// (seed, tensor, element, gradient bits) with no RNG state to carry between
// steps, so it also works inside a replayed CUDA graph.
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Stochastic rounding of fp32 to bf16: add 16 random bits below the bf16
// mantissa, then truncate. E[result] = x for finite x; inf/nan pass through.
__device__ __forceinline__ __nv_bfloat16 bf16_stochastic(float x, uint32_t rnd) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += (rnd & 0xffffu);
  return __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
}

// ---- vector loads/stores ----------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The integer vector type of a given size, so that pack accesses compile to
// single ld.global.nc.v4 / st.global.v4 instructions. The table's pointers
// are generic; without the explicit global intrinsics the compiler emits
// generic loads and stores.
template <int Bytes> struct Word;
template <> struct Word<16> { using type = uint4; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<2> { using type = unsigned short; };

// Read-only path (ld.global.nc) is safe: within one launch each element is
// read by exactly one thread, before that thread writes it.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  using V = typename Word<sizeof(T) * N>::type;
  const V w = __ldg(reinterpret_cast<const V*>(p));
  Pack<T, N> out;
  memcpy(&out, &w, sizeof(V));
  return out;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pk) {
  using V = typename Word<sizeof(T) * N>::type;
  V w;
  memcpy(&w, &pk, sizeof(V));
  __stwb(reinterpret_cast<V*>(p), w);
}

// N consecutive elements from base[i]; for N > 1 the caller guarantees base is
// 16-byte aligned and i a multiple of N, so every Pack access is aligned
// (a pack is at most 16 bytes: wider rows are split into several packs).
template <int N, typename T, typename A>
__device__ __forceinline__ void load_n(const T* base, int64_t i, A (&out)[N]) {
  constexpr int kPer = (N * sizeof(T) > 16) ? static_cast<int>(16 / sizeof(T)) : N;
#pragma unroll
  for (int k = 0; k < N; k += kPer) {
    const Pack<T, kPer> pk = load_pack<T, kPer>(base + i + k);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k + j] = static_cast<A>(widen(pk.v[j]));
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_n(T* base, int64_t i, const T (&in)[N]) {
  constexpr int kPer = (N * sizeof(T) > 16) ? static_cast<int>(16 / sizeof(T)) : N;
#pragma unroll
  for (int k = 0; k < N; k += kPer) {
    Pack<T, kPer> pk;
#pragma unroll
    for (int j = 0; j < kPer; ++j) pk.v[j] = in[k + j];
    store_pack<T, kPer>(base + i + k, pk);
  }
}

// Calls body(std::integral_constant<int, W>{}, i) for the elements [begin, end)
// of one chunk, W = N (16-byte vectors) where the tensor is vectorised and
// W = 1 for the scalar tail or an unaligned tensor. Indices are 64-bit.
template <int N, class Body>
__device__ __forceinline__ void walk_chunk(int64_t begin, int64_t end, bool vectorised, Body&& body) {
  if (vectorised) {
    const int64_t full_end = begin + (end - begin) / N * N;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * N; i < full_end;
         i += static_cast<int64_t>(blockDim.x) * N) {
      body(std::integral_constant<int, N>{}, i);
    }
    begin = full_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) body(std::integral_constant<int, 1>{}, i);
}

// ---- scalars ----------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A read_scalar(const ScalarArg& s, int64_t row = 0) {
  if (s.ptr == nullptr) return static_cast<A>(s.value);
  switch (s.dtype) {
    case kF64: return static_cast<A>(static_cast<const double*>(s.ptr)[row]);
    case kF16: return static_cast<A>(__half2float(static_cast<const __half*>(s.ptr)[row]));
    case kBF16: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(s.ptr)[row]));
    default: return static_cast<A>(static_cast<const float*>(s.ptr)[row]);
  }
}

// A hyperparameter for element i: per stacked-trial row when per_row, else
// the value read once per thread (`once`).
template <typename A>
__device__ __forceinline__ A scalar_at(const ScalarArg& s, A once, int64_t i, int64_t row_len) {
  return s.per_row ? read_scalar<A>(s, i / row_len) : once;
}

// True when the AMP scaler found inf/nan: the step must change nothing.
__device__ __forceinline__ bool step_skipped(const ScalarArg& found_inf) {
  return found_inf.ptr != nullptr && read_scalar<float>(found_inf) != 0.0f;
}

// ---- block reduction ----------------------------------------------------------
// Sum of (a, b) over the block; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T sa[kThreads / 32], sb[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  if (warp == 0) {
    a = lane < static_cast<int>(blockDim.x / 32) ? sa[lane] : T(0);
    b = lane < static_cast<int>(blockDim.x / 32) ? sb[lane] : T(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// Sums the per-block partials (2 doubles per block) of tensor e into (a, b),
// in a fixed order, so norms are deterministic run to run.
__device__ __forceinline__ void segment_sum2(const double* partials, const Entry& e, int64_t chunk_size,
                                             double& a, double& b) {
  a = 0.0;
  b = 0.0;
  const int64_t nb = n_chunks(e.numel, chunk_size);
  for (int64_t k = threadIdx.x; k < nb; k += blockDim.x) {
    a += partials[2 * (e.first_block + k)];
    b += partials[2 * (e.first_block + k) + 1];
  }
  block_sum2(a, b);
}

// ---- launch -------------------------------------------------------------------
// FASTSGD_LAUNCH(kernel, blocks, stream)(args) is kernel<<<blocks, kThreads, 0,
// stream>>>(args). A macro so that csrc/cuda_emu can compile these sources for
// the CPU (tests without a GPU), where <<<>>> does not exist.
#ifdef FASTSGD_CUDA_EMULATION
#define FASTSGD_LAUNCH(kernel, blocks, stream) \
  (static_cast<void>(stream), ::fastsgd::emu::launch(kernel, blocks, kThreads))
#else
#define FASTSGD_LAUNCH(kernel, blocks, stream) kernel<<<blocks, kThreads, 0, stream>>>
#endif

inline void check_launch(const char* op, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastsgd cuda ") + op + ": launch of " + kernel + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace cuda
}  // namespace fastsgd
