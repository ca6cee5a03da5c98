// Storage types of the CPU kernels and their exact conversions.
//
// Parameters and state may be float32, float64, bfloat16 or float16. Math runs
// in float32 for the 32- and 16-bit types and in float64 when either side is
// float64; 16-bit values are widened exactly and narrowed with
// round-to-nearest-even. The conversions are branch-free integer/float code
// so that GCC vectorises the element loops without needing F16C or AVX-512
// (the wheel is built without -march=native).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

// The element loops are compiled twice on x86-64 and picked at load time by
// the CPU's features: baseline x86-64 (SSE2, runs anywhere) and x86-64-v3
// (AVX2 + FMA: twice the vector width, which a single core needs to keep up
// with memory; measured ~8% faster per thread than the SSE2 build on the
// ResNet-50 Nesterov step). Elsewhere: one baseline build.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTSGD_NO_CLONES)
#define FASTSGD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTSGD_CLONES
#endif

namespace fastsgd {
namespace cpu {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Dtype codes shared with fastsgd/kernels/cpu.py (exported as _C.cpu_dtype_codes).
enum DtypeCode : int64_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kNumDtypes = 4 };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// cond ? a : b written with masks: GCC keeps `?:` chains as branches in the
// float16 conversions, which stops the element loops from vectorising.
inline uint32_t select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(cond);
  return (a & mask) | (b & ~mask);
}

// bfloat16 is the upper half of a float32: widening is a shift. Narrowing adds
// just under half an ulp plus the lowest kept bit (ties go to even), except for
// NaN, which is kept a quiet NaN instead of possibly rounding to infinity.
inline float widen(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }
inline bf16 narrow_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{uint16_t(is_nan ? quiet_nan : rounded)};
}

// float16 -> float32. Exponent/mantissa move to float32's position and the
// exponent is rebiased; all-ones exponents (inf/NaN) get float32's all-ones;
// zeros and subnormals are built as a normal float32 one exponent step up
// minus 2^-14, which is exact and never creates a float32 subnormal (so the
// result does not depend on denormals-are-zero modes).
inline float widen(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t body = (h & 0x7fffu) << 13;
  const uint32_t exponent = body & 0x0f800000u;
  const uint32_t normal = body + (112u << 23);
  const uint32_t inf_nan = normal + (112u << 23);
  const uint32_t subnormal = float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t r = select(exponent == 0x0f800000u, inf_nan, select(exponent == 0, subnormal, normal));
  return bits_float(r | sign);
}

// float32 -> float16, round to nearest even.
//  |f| >= 2^16 (and inf/NaN): inf, or a quiet NaN.
//  |f| <  2^-14: the result is subnormal or zero; adding 0.5 puts the value in
//     a binade whose ulp is float16's subnormal step 2^-24, so the hardware
//     add does the rounding and the low bits are the float16 mantissa.
//  otherwise: rebias the exponent and round the 13 dropped bits to even; a
//     carry out of the mantissa correctly bumps the exponent (65520 -> inf).
inline f16 narrow_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t inf_nan = select(a > 0x7f800000u, 0x7e00u, 0x7c00u);
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // 0xc8000000 = (15 - 127) << 23
  const uint32_t r = select(a >= 0x47800000u, inf_nan, select(a < 0x38800000u, subnormal, normal));
  return f16{uint16_t(r | sign)};
}

// Num<T>: the math type of storage type T, and loads/stores between them.
template <class T> struct Num;
template <> struct Num<float> {
  using math = float;
  static constexpr int64_t code = kFloat32;
  static float load(float x) { return x; }
  template <class C> static float store(C x) { return static_cast<float>(x); }
};
template <> struct Num<double> {
  using math = double;
  static constexpr int64_t code = kFloat64;
  static double load(double x) { return x; }
  template <class C> static double store(C x) { return static_cast<double>(x); }
};
template <> struct Num<bf16> {
  using math = float;
  static constexpr int64_t code = kBFloat16;
  static float load(bf16 x) { return widen(x); }
  template <class C> static bf16 store(C x) { return narrow_bf16(static_cast<float>(x)); }
};
template <> struct Num<f16> {
  using math = float;
  static constexpr int64_t code = kFloat16;
  static float load(f16 x) { return widen(x); }
  template <class C> static f16 store(C x) { return narrow_f16(static_cast<float>(x)); }
};

// The math type for a pair of storage types: float64 if either is float64.
template <class A, class B>
using MathOf = std::conditional_t<std::is_same<typename Num<A>::math, double>::value ||
                                      std::is_same<typename Num<B>::math, double>::value,
                                  double, float>;

template <class T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the storage type with dtype code `code`
// (validated by the caller before any parallel region).
template <class F>
void with_dtype(int64_t code, F&& f) {
  switch (code) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat64: f(TypeTag<double>{}); break;
    case kBFloat16: f(TypeTag<bf16>{}); break;
    default: f(TypeTag<f16>{}); break;
  }
}

// Calls f(std::integral_constant<bool, b>{}): turns a runtime flag into a
// template parameter so that loops are specialised instead of branching.
template <class F>
void with_flag(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace cpu
}  // namespace fastsgd
