// FLEXFED_CPU_CLONES: a CPU loop compiled for x86-64-v4 (AVX-512), v3 (AVX2, FMA) and baseline
// x86-64, the one the CPU supports picked when the program loads (GCC's target_clones).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FLEXFED_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLEXFED_CPU_CLONES
#endif
