// Stand-in for the CUDA toolkit header when csrc/cuda is compiled for the CPU emulator.
#pragma once
#include "../cuda_emu.h"
