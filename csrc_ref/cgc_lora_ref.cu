// CGC-LoRA forward in plain CUDA C++: the hand-written GPU baseline (no tensor cores, no routing).
//
// One thread block per tile of TILE_M consecutive tokens, whatever their tasks:
//   phase 1: one warp per (token, stacked rank row k) computes z[k] = A[k, :] . drop(x_m), lanes
//            striding d_in so loads coalesce, a shuffle reduction, and stores s * g[e(k)] * z[k]
//            in shared memory ([TILE_M, (S+K) r]);
//   phase 2: one thread per (token, output column o) computes delta[m, o] = sum_k B[o, k] zs[k].
// Shared rank rows come first (A = shared_a[c], B = shared_b[c] for k < S*r), then the task's
// (task_a[t], task_b[t]); the expert of row k is e = k / r. Tokens of task -1 get zeros.
// Accumulation is in the storage type (float32 or float64). Offsets are int64.
//
// The file needs only the CUDA runtime: `nvcc -c -arch=sm_80 cgc_lora_ref.cu` builds it without
// torch. cgc_lora_ref.cpp calls the C launcher below from its torch binding.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kMaxTileM = 8;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // the default dynamic shared memory limit

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cgc_lora_ref_forward_kernel(
    const scalar_t* __restrict__ x,             // [M, d_in]
    const int64_t* __restrict__ task_ids,       // [M] in [-1, T)
    const scalar_t* __restrict__ gates,         // [T, S+K], or [M, S+K] with per_token_gates
    const scalar_t* __restrict__ shared_a,      // [C, S*r, d_in]
    const scalar_t* __restrict__ shared_b,      // [C, d_out, S*r]
    const scalar_t* __restrict__ task_a,        // [T, K*r, d_in]
    const scalar_t* __restrict__ task_b,        // [T, d_out, K*r]
    const int64_t* __restrict__ task_cluster,   // [T] in [0, C), or null: one cluster
    const uint8_t* __restrict__ keep_mask,      // [M, d_in], or null: no dropout
    scalar_t* __restrict__ out,                 // [M, d_out]
    int64_t M, int64_t d_in, int64_t d_out, int64_t S, int64_t K, int64_t r,
    int per_token_gates, scalar_t scaling, scalar_t inv_keep, int tile_m) {
  extern __shared__ unsigned char smem_raw[];
  scalar_t* zs = reinterpret_cast<scalar_t*>(smem_raw);  // [tile_m, R]
  const int64_t Sr = S * r, Kr = K * r, R = Sr + Kr, E = S + K;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * tile_m;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;

  // Phase 1. The loop bound depends on the warp only, so every lane joins each shuffle.
  for (int64_t p = warp; p < tile_m * R; p += num_warps) {
    const int64_t mi = p / R, k = p % R, m = m0 + mi;
    const int64_t t = m < M ? task_ids[m] : -1;
    scalar_t acc = 0;
    if (t >= 0) {
      const int64_t c = task_cluster ? task_cluster[t] : 0;
      const scalar_t* a = k < Sr ? shared_a + (c * Sr + k) * d_in : task_a + (t * Kr + (k - Sr)) * d_in;
      const scalar_t* xm = x + m * d_in;
      for (int64_t i = lane; i < d_in; i += 32) {
        scalar_t h = xm[i];
        if (keep_mask) h = keep_mask[m * d_in + i] ? h * inv_keep : scalar_t(0);
        acc += a[i] * h;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) {
      scalar_t weighted = 0;
      if (t >= 0) weighted = scaling * gates[(per_token_gates ? m : t) * E + k / r] * acc;
      zs[mi * R + k] = weighted;
    }
  }
  __syncthreads();

  // Phase 2.
  for (int64_t p = threadIdx.x; p < tile_m * d_out; p += blockDim.x) {
    const int64_t mi = p / d_out, o = p % d_out, m = m0 + mi;
    if (m >= M) continue;
    const int64_t t = task_ids[m];
    scalar_t acc = 0;
    if (t >= 0) {
      const int64_t c = task_cluster ? task_cluster[t] : 0;
      const scalar_t* z = zs + mi * R;
      const scalar_t* bs = shared_b + (c * d_out + o) * Sr;
      const scalar_t* bt = task_b + (t * d_out + o) * Kr;
      for (int64_t k = 0; k < Sr; ++k) acc += bs[k] * z[k];
      for (int64_t k = 0; k < Kr; ++k) acc += bt[k] * z[Sr + k];
    }
    out[m * d_out + o] = acc;
  }
}

template <typename scalar_t>
int launch(const void* x, const int64_t* task_ids, const void* gates, const void* shared_a,
           const void* shared_b, const void* task_a, const void* task_b, const int64_t* task_cluster,
           const uint8_t* keep_mask, void* out, int64_t M, int64_t d_in, int64_t d_out, int64_t S,
           int64_t K, int64_t r, int per_token_gates, double scaling, double inv_keep, cudaStream_t stream) {
  if (M == 0 || d_out == 0) return cudaSuccess;  // an empty grid is not a valid launch
  const int64_t R = (S + K) * r;
  const size_t row_bytes = static_cast<size_t>(R) * sizeof(scalar_t);
  if (R < 1 || row_bytes > kMaxSharedBytes) return cudaErrorInvalidValue;  // z of one token must fit
  int tile_m = static_cast<int>(kMaxSharedBytes / row_bytes);
  if (tile_m > kMaxTileM) tile_m = kMaxTileM;
  const int64_t blocks = (M + tile_m - 1) / tile_m;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  cgc_lora_ref_forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, tile_m * row_bytes, stream>>>(
      static_cast<const scalar_t*>(x), task_ids, static_cast<const scalar_t*>(gates),
      static_cast<const scalar_t*>(shared_a), static_cast<const scalar_t*>(shared_b),
      static_cast<const scalar_t*>(task_a), static_cast<const scalar_t*>(task_b), task_cluster, keep_mask,
      static_cast<scalar_t*>(out), M, d_in, d_out, S, K, r, per_token_gates, static_cast<scalar_t>(scaling),
      static_cast<scalar_t>(inv_keep), tile_m);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// delta = s * sum_e g_e B_e A_e drop(x) into out [M, d_out], launched on `stream` (a cudaStream_t).
// All pointers are device pointers of contiguous tensors; is_double selects float64 over float32
// for every float tensor (gates included). Returns a cudaError_t (0: launched).
extern "C" int cgc_lora_ref_forward_cuda(int is_double, const void* x, const int64_t* task_ids, const void* gates,
                                         const void* shared_a, const void* shared_b, const void* task_a,
                                         const void* task_b, const int64_t* task_cluster, const uint8_t* keep_mask,
                                         void* out, int64_t M, int64_t d_in, int64_t d_out, int64_t S, int64_t K,
                                         int64_t r, int per_token_gates, double scaling, double inv_keep,
                                         void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (is_double)
    return launch<double>(x, task_ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, keep_mask, out, M,
                          d_in, d_out, S, K, r, per_token_gates, scaling, inv_keep, s);
  return launch<float>(x, task_ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, keep_mask, out, M,
                       d_in, d_out, S, K, r, per_token_gates, scaling, inv_keep, s);
}

extern "C" const char* cgc_lora_ref_cuda_error_string(int code) {
  if (code == cudaErrorInvalidValue)
    return "invalid value (the (S+K)*r rank of one token must fit in 48 KiB of shared memory)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
