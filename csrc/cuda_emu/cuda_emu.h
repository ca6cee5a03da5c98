// The CUDA device language, as far as csrc/cuda/*.cu use it, for the host
// C++ compiler: fastsgd._cuda_emu compiles those kernel sources unchanged for
// the CPU so that tests can run them on machines without a GPU (CI has none).
//
// Execution model (scheduler.cpp): one kernel launch runs its blocks one after
// another; the threads of a block are cooperative fibers on one OS thread,
// switched only at __syncthreads and warp shuffles. So barriers, shared
// memory and shuffles behave as on a GPU, and runs are deterministic. What
// it cannot show: races between blocks or threads, the memory model, launch
// limits, timing. It is a correctness check of the kernel *source*, not a
// replacement for running it on a GPU.
//
// Included through the stand-in <cuda_runtime.h>, <cuda_fp16.h> and
// <cuda_bf16.h> in include/, which the _cuda_emu target puts first on the
// include path.
#pragma once

#include <math.h>  // libstdc++'s math.h: float overloads of sqrt/pow/fmin, as in CUDA

#include <cstdint>
#include <cstring>

// ---- qualifiers ------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static array per declaration is exactly
// one block's shared memory.
#define __shared__ static

// ---- built-in variables and vector types --------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

// Set by the scheduler before it resumes a thread (fiber).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// ---- 16-bit floats: storage types with round-to-nearest-even conversions -----
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.x) << 16); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};  // nan
  return __nv_bfloat16{static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// ---- memory intrinsics ---------------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline void __stwb(T* p, T v) { *p = v; }

// ---- synchronisation (scheduler.cpp) -----------------------------------------------------------
namespace fastsgd {
namespace emu {
void sync_block();  // every live thread of the block arrives
void sync_warp();   // every live thread of the caller's warp arrives
// The caller's 8-byte slot in the block's shuffle exchange area, and lane `lane`'s.
unsigned char* shuffle_slot(unsigned thread);

// Runs body(ctx) as every thread of every block of a grid.
void run_grid(unsigned blocks, unsigned threads, void (*body)(void*), void* ctx);
// Grids run so far (kernel launches), for tests that count launches per step.
std::uint64_t grids_run();

// `kernel<<<blocks, threads>>>(args...)` spelled launch(kernel, blocks, threads)(args...).
template <class Kernel>
struct Launch {
  Kernel* kernel;
  unsigned blocks, threads;
  template <class... Args>
  void operator()(const Args&... args) const {
    auto call = [&] { kernel(args...); };
    run_grid(blocks, threads, [](void* c) { (*static_cast<decltype(call)*>(c))(); }, &call);
  }
};
template <class Kernel>
Launch<Kernel> launch(Kernel* kernel, unsigned blocks, unsigned threads) { return {kernel, blocks, threads}; }
}  // namespace emu
}  // namespace fastsgd

inline void __syncthreads() { fastsgd::emu::sync_block(); }

// Every lane publishes its value, the warp meets, each lane reads lane + offset.
template <typename T>
inline T __shfl_down_sync(unsigned /*mask: the kernels always pass the full warp*/, T v, unsigned offset) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  const unsigned me = threadIdx.x;
  std::memcpy(fastsgd::emu::shuffle_slot(me), &v, sizeof(T));
  fastsgd::emu::sync_warp();
  T out = v;
  if (me % 32 + offset < 32) std::memcpy(&out, fastsgd::emu::shuffle_slot(me + offset), sizeof(T));
  fastsgd::emu::sync_warp();  // nobody overwrites a slot before its reader is done
  return out;
}

// ---- runtime API: no device, nothing ever fails ------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 0; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
