// CPU-only: function multiversioning for the hot loops.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
// One build runs everywhere; hot loops get an AVX2 clone picked at load time.
#define PBRF_CPU_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define PBRF_CPU_MULTIVERSION
#endif

#if defined(__GNUC__)
#define PBRF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PBRF_ALWAYS_INLINE inline
#endif
