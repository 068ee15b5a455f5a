// CPU emulation of the parts of the CUDA runtime and execution model that
// csrc/cuda/*.cu use, so the same kernels and launchers run (slowly, exactly)
// on a machine without a GPU. The build compiles the .cu files with g++
// against this header instead of the real <cuda_runtime.h>, after
// csrc/emulation/translate_cuda.py rewrote the two pieces of CUDA syntax that
// are not C++ (kernel<<<...>>>(args) and __shared__ declarations).
//
// What is emulated faithfully (csrc/emulation/emulator.cpp):
// - a block's threads run as cooperative fibers, so __syncthreads(),
//   __syncthreads_or(), __syncwarp() and warp shuffles really wait for the
//   other threads; a barrier that not every thread reaches, or a full-mask warp
//   op with lanes that exited, is reported as an error instead of hanging;
// - __shared__ memory is per block, filled with 0xFF bytes (NaN as float) at
//   the start of every block so a read before a write shows up, and followed
//   by a guard that must still be intact when the block ends;
// - launch configurations are checked against the hardware limits (1024
//   threads a block, 48 KiB of shared memory without opt-in, grid y/z <= 65535);
// - the order in which a block's threads run between barriers, and the order of
//   the blocks, can be forward, reverse or shuffled, so a result that depends on
//   it (a race) shows up.
// What is not: timing, blocks running at the same time (they run one after
// another), and global-memory bounds (the tests guard their buffers instead).
// Device memory is host memory; streams are synchronous.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
};

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

namespace pbrf_emu {

// Index variables of the thread now running (valid only inside a kernel).
const dim3& thread_index();
const dim3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

void sync_threads();
int sync_threads_or(int predicate);
void sync_warp(unsigned mask);
// Lane `lane ^ lane_mask`'s value of `bytes` bytes, exchanged among the lanes of `mask`.
void shuffle_xor(unsigned mask, const void* value, void* result, size_t bytes, int lane_mask,
                 int width);

// Storage of one `__shared__` declaration for the running block (key: the declaration).
void* static_shared(const void* key, size_t bytes);
// The launch's dynamic shared memory (`extern __shared__ T name[];`).
void* dynamic_shared();

// Runs `body` once per thread of every block of the grid; errors are recorded for
// cudaGetLastError(), as a real launch does.
void run_kernel(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

template <class Array, int Site>
struct SharedDeclaration {
  static Array& storage() {
    static const char key = 0;  // one address per declaration and instantiation
    return *static_cast<Array*>(static_shared(&key, sizeof(Array)));
  }
};

// `kernel<<<grid, block, shared, stream>>>(args...)` becomes
// `::pbrf_emu::Launch(grid, block, shared, stream)(kernel, args...)`.
struct Launch {
  dim3 grid, block;
  size_t shared;
  Launch(dim3 grid_, dim3 block_, size_t shared_ = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), shared(shared_) {}

  template <class... Params, class... Args>
  void operator()(void (*kernel)(Params...), Args&&... args) const {
    static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
    // Arguments are copied once, by value, as the CUDA launch does.
    const std::tuple<std::decay_t<Params>...> values(static_cast<std::decay_t<Params>>(args)...);
    run_kernel(grid, block, shared, [&] { std::apply(kernel, values); });
  }
};

}  // namespace pbrf_emu

#define threadIdx (::pbrf_emu::thread_index())
#define blockIdx (::pbrf_emu::block_index())
#define blockDim (::pbrf_emu::block_dim())
#define gridDim (::pbrf_emu::grid_dim())

inline void __syncthreads() { ::pbrf_emu::sync_threads(); }
inline int __syncthreads_or(int predicate) { return ::pbrf_emu::sync_threads_or(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::pbrf_emu::sync_warp(mask); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffle of this type");
  T result;
  ::pbrf_emu::shuffle_xor(mask, &value, &result, sizeof(T), lane_mask, width);
  return result;
}

// Fibers never pre-empt each other, so a plain read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
