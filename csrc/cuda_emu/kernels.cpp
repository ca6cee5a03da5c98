// The CUDA kernel sources, unchanged, compiled by the host compiler against
// cuda_emu.h (see there). Each .cu keeps its helpers in an anonymous
// namespace; their names do not collide.
#include "cuda/sgd.cu"
#include "cuda/lars.cu"
#include "cuda/lamb.cu"
#include "cuda/runtime.cu"
