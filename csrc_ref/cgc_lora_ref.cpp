// CGC-LoRA forward and backward in plain C++: a second, independent implementation of the op
// (docs/design.md sections 2-3), written as loops over tokens, rank rows and features so that it shares
// no structure with the PyTorch reference (matmuls per cluster and task) or the Triton kernels
// (tiles of same-task tokens).
//
// For token m with task t = task_ids[m] (-1: no adapter), cluster c = task_cluster[t], gate row
// g = gates[t] (or gates[m]), h = drop(x_m) = x_m * keep[m] / (1 - p), and the stacked rank index
// k (shared rows 0..S*r-1, then task rows), whose expert is e = k / r:
//
//   z[k]       = A[k, :] . h                          (A = shared_a[c] for k < S*r, else task_a[t])
//   delta[m,o] = s * sum_k g[e(k)] * B[o, k] * z[k]   (B = shared_b[c] / task_b[t] likewise)
//
//   dz[k]        = sum_o B[o, k] dy[m, o]
//   dx[m, i]     = keep[m, i] / (1 - p) * s * sum_k g[e(k)] dz[k] A[k, i]
//   dA[k, i]    += s * g[e(k)] * dz[k] * h[i]         (over the tokens of A's cluster or task)
//   dB[o, k]    += s * g[e(k)] * dy[m, o] * z[k]
//   dgates[e]   += s * sum_{k in e} dz[k] z[k]        (per task, or per token)
//
// Everything accumulates in float64 whatever the storage type (float32 or float64), so this side
// is the more precise one of any comparison. Parallel loops (OpenMP) only ever write rows that
// belong to one iteration: forward, dx and the per-token terms per token; dA and dB per output
// row, summing their tokens in index order; so results do not depend on the thread count.
//
// The bottom of the file binds the CPU op (and, with CGC_REF_WITH_CUDA, the CUDA forward of
// cgc_lora_ref.cu through its C launcher) to Python; cgc_kernels/csrc_ref.py builds and loads it.

#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cgc_ref {

// Sizes, flags and index tensors of one call; the float tensors are passed separately.
struct Problem {
  int64_t M = 0, d_in = 0, d_out = 0, T = 0, C = 0, S = 0, K = 0, r = 0;
  double scaling = 1.0;
  double inv_keep = 1.0;               // 1 / (1 - dropout_p)
  bool per_token_gates = false;
  const int64_t* task_ids = nullptr;   // [M] in [-1, T)
  const int64_t* task_cluster = nullptr;  // [T] in [0, C), or nullptr: one cluster
  const uint8_t* keep = nullptr;       // [M, d_in] keep-mask, or nullptr: no dropout
  int num_threads = 1;

  int64_t Sr() const { return S * r; }
  int64_t Kr() const { return K * r; }
  int64_t R() const { return (S + K) * r; }
  int64_t E() const { return S + K; }
  int64_t cluster_of(int64_t t) const { return task_cluster ? task_cluster[t] : 0; }
  int64_t gate_row(int64_t m, int64_t t) const { return per_token_gates ? m : t; }
};

template <typename scalar_t>
struct Experts {
  const scalar_t* shared_a;  // [C, S*r, d_in]
  const scalar_t* shared_b;  // [C, d_out, S*r]
  const scalar_t* task_a;    // [T, K*r, d_in]
  const scalar_t* task_b;    // [T, d_out, K*r]
  const scalar_t* gates;     // [T, S+K] or [M, S+K]
};

// Row k of the stacked A seen by a token of task t in cluster c: [d_in].
template <typename scalar_t>
inline const scalar_t* a_row(const Problem& p, const Experts<scalar_t>& w, int64_t c, int64_t t, int64_t k) {
  return k < p.Sr() ? w.shared_a + (c * p.Sr() + k) * p.d_in
                    : w.task_a + (t * p.Kr() + (k - p.Sr())) * p.d_in;
}

// B[o, k] of the stacked B seen by a token of task t in cluster c.
template <typename scalar_t>
inline double b_at(const Problem& p, const Experts<scalar_t>& w, int64_t c, int64_t t, int64_t o, int64_t k) {
  return k < p.Sr() ? static_cast<double>(w.shared_b[(c * p.d_out + o) * p.Sr() + k])
                    : static_cast<double>(w.task_b[(t * p.d_out + o) * p.Kr() + (k - p.Sr())]);
}

// h = drop(x_m) in float64: [d_in].
template <typename scalar_t>
inline void dropped_input(const Problem& p, const scalar_t* x, int64_t m, double* h) {
  const scalar_t* xm = x + m * p.d_in;
  for (int64_t i = 0; i < p.d_in; ++i) {
    double v = static_cast<double>(xm[i]);
    if (p.keep) v = p.keep[m * p.d_in + i] ? v * p.inv_keep : 0.0;
    h[i] = v;
  }
}

// z[k] = A[k, :] . h for every stacked rank row k: [R].
template <typename scalar_t>
inline void rank_projection(const Problem& p, const Experts<scalar_t>& w, int64_t c, int64_t t,
                            const double* h, double* z) {
  for (int64_t k = 0; k < p.R(); ++k) {
    const scalar_t* a = a_row(p, w, c, t, k);
    double acc = 0.0;
    for (int64_t i = 0; i < p.d_in; ++i) acc += static_cast<double>(a[i]) * h[i];
    z[k] = acc;
  }
}

// delta = s * sum_e g_e B_e A_e drop(x): out [M, d_out].
template <typename scalar_t>
void forward(const Problem& p, const scalar_t* x, const Experts<scalar_t>& w, scalar_t* out) {
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<double> h(p.d_in), z(p.R());
#pragma omp for schedule(static)
    for (int64_t m = 0; m < p.M; ++m) {
      scalar_t* om = out + m * p.d_out;
      const int64_t t = p.task_ids[m];
      if (t < 0) {
        for (int64_t o = 0; o < p.d_out; ++o) om[o] = scalar_t(0);
        continue;
      }
      const int64_t c = p.cluster_of(t);
      const scalar_t* g = w.gates + p.gate_row(m, t) * p.E();
      dropped_input(p, x, m, h.data());
      rank_projection(p, w, c, t, h.data(), z.data());
      for (int64_t k = 0; k < p.R(); ++k) z[k] *= p.scaling * static_cast<double>(g[k / p.r]);
      for (int64_t o = 0; o < p.d_out; ++o) {
        double acc = 0.0;
        for (int64_t k = 0; k < p.R(); ++k) acc += b_at(p, w, c, t, o, k) * z[k];
        om[o] = static_cast<scalar_t>(acc);
      }
    }
  }
}

template <typename scalar_t>
struct Grads {
  scalar_t* x;         // [M, d_in]
  scalar_t* gates;     // like gates
  scalar_t* shared_a;  // [C, S*r, d_in]
  scalar_t* shared_b;  // [C, d_out, S*r]
  scalar_t* task_a;    // [T, K*r, d_in]
  scalar_t* task_b;    // [T, d_out, K*r]
};

// Every gradient of the op given dy = dL/d(delta): [M, d_out].
template <typename scalar_t>
void backward(const Problem& p, const scalar_t* dy, const scalar_t* x, const Experts<scalar_t>& w,
              const Grads<scalar_t>& grad) {
  const int64_t M = p.M, d_in = p.d_in, d_out = p.d_out, R = p.R(), E = p.E(), Sr = p.Sr(), Kr = p.Kr();
  // Per-token float64 scratch: h = drop(x) [M, d_in]; the gate-scaled factors of dA and dB,
  // P[m, k] = s g dz[k] and Q[m, k] = s g z[k] [M, R]; each token's dgates term [M, E].
  std::vector<double> H(M * d_in), P(M * R), Q(M * R), DG(M * E);

  // Pass 1, per token: h, z, dz, dx and the gate terms.
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<double> z(R), dz(R), dh(d_in);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* dxm = grad.x + m * d_in;
      double* hm = H.data() + m * d_in;
      const int64_t t = p.task_ids[m];
      if (t < 0) {  // no adapter: no gradient, and nothing for the reductions below
        for (int64_t i = 0; i < d_in; ++i) dxm[i] = scalar_t(0);
        continue;
      }
      const int64_t c = p.cluster_of(t);
      const scalar_t* g = w.gates + p.gate_row(m, t) * E;
      const scalar_t* dym = dy + m * d_out;
      dropped_input(p, x, m, hm);
      rank_projection(p, w, c, t, hm, z.data());
      for (int64_t k = 0; k < R; ++k) {
        double acc = 0.0;
        for (int64_t o = 0; o < d_out; ++o) acc += b_at(p, w, c, t, o, k) * static_cast<double>(dym[o]);
        dz[k] = acc;
      }
      double* dgm = DG.data() + m * E;
      for (int64_t e = 0; e < E; ++e) dgm[e] = 0.0;
      for (int64_t i = 0; i < d_in; ++i) dh[i] = 0.0;
      for (int64_t k = 0; k < R; ++k) {
        const double ge = p.scaling * static_cast<double>(g[k / p.r]);
        dgm[k / p.r] += p.scaling * dz[k] * z[k];
        P[m * R + k] = ge * dz[k];
        Q[m * R + k] = ge * z[k];
        const scalar_t* a = a_row(p, w, c, t, k);
        for (int64_t i = 0; i < d_in; ++i) dh[i] += P[m * R + k] * static_cast<double>(a[i]);
      }
      for (int64_t i = 0; i < d_in; ++i) {
        double v = dh[i];
        if (p.keep) v = p.keep[m * d_in + i] ? v * p.inv_keep : 0.0;
        dxm[i] = static_cast<scalar_t>(v);
      }
    }
  }

  // Token lists in index order: per cluster (shared experts) and per task (task experts).
  std::vector<std::vector<int64_t>> of_cluster(p.C), of_task(p.T);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = p.task_ids[m];
    if (t < 0) continue;
    of_cluster[p.cluster_of(t)].push_back(m);
    of_task[t].push_back(m);
  }

  // dA[k, i] = sum_m P[m, k] h[m, i] and dB[o, k] = sum_m dy[m, o] Q[m, k], one output row per
  // iteration. `col` is the column of P / Q that the block's rank rows start at.
  auto reduce_a = [&](scalar_t* dA, int64_t groups, int64_t rows, int64_t col,
                      const std::vector<std::vector<int64_t>>& tokens) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads)
    for (int64_t gk = 0; gk < groups * rows; ++gk) {
      const int64_t grp = gk / rows, k = col + gk % rows;
      std::vector<double> acc(d_in, 0.0);
      for (int64_t m : tokens[grp]) {
        const double pk = P[m * R + k];
        const double* hm = H.data() + m * d_in;
        for (int64_t i = 0; i < d_in; ++i) acc[i] += pk * hm[i];
      }
      scalar_t* row = dA + gk * d_in;
      for (int64_t i = 0; i < d_in; ++i) row[i] = static_cast<scalar_t>(acc[i]);
    }
  };
  auto reduce_b = [&](scalar_t* dB, int64_t groups, int64_t rows, int64_t col,
                      const std::vector<std::vector<int64_t>>& tokens) {
#pragma omp parallel for schedule(static) num_threads(p.num_threads)
    for (int64_t go = 0; go < groups * d_out; ++go) {
      const int64_t grp = go / d_out, o = go % d_out;
      std::vector<double> acc(rows, 0.0);
      for (int64_t m : tokens[grp]) {
        const double dyo = static_cast<double>(dy[m * d_out + o]);
        const double* qm = Q.data() + m * R + col;
        for (int64_t k = 0; k < rows; ++k) acc[k] += dyo * qm[k];
      }
      scalar_t* row = dB + go * rows;
      for (int64_t k = 0; k < rows; ++k) row[k] = static_cast<scalar_t>(acc[k]);
    }
  };
  reduce_a(grad.shared_a, p.C, Sr, 0, of_cluster);
  reduce_b(grad.shared_b, p.C, Sr, 0, of_cluster);
  reduce_a(grad.task_a, p.T, Kr, Sr, of_task);
  reduce_b(grad.task_b, p.T, Kr, Sr, of_task);

  // dgates: each token's own row, or the sum over the task's tokens in index order.
  if (p.per_token_gates) {
    for (int64_t m = 0; m < M * E; ++m) grad.gates[m] = static_cast<scalar_t>(DG[m]);
  } else {
    for (int64_t t = 0; t < p.T; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        double acc = 0.0;
        for (int64_t m : of_task[t]) acc += DG[m * E + e];
        grad.gates[t * E + e] = static_cast<scalar_t>(acc);
      }
    }
  }
}

}  // namespace cgc_ref

#ifndef CGC_REF_NO_TORCH
// ---- Python binding (torch tensors in, torch tensors out) ----------------------------------------
// Light ATen headers only (not torch/extension.h): the first build takes seconds, not a minute.
// The Python wrappers in cgc_kernels/csrc_ref.py validate arguments and make every tensor
// contiguous with the expected dtype; the checks here only keep a direct caller from reading
// out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "cgc_lora_ref: ", what); }

void check_float(const Tensor& t, const Tensor& x, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "cgc_lora_ref: ", name, " must have x's dtype");
  TORCH_CHECK(t.device() == x.device(), "cgc_lora_ref: ", name, " must be on x's device");
  TORCH_CHECK(t.is_contiguous(), "cgc_lora_ref: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes().vec() == shape, "cgc_lora_ref: ", name, " has the wrong shape");
}

// Sizes and pointers of one call, checked against each other.
cgc_ref::Problem make_problem(const Tensor& x, const Tensor& task_ids, const Tensor& gates,
                              const Tensor& shared_a, const Tensor& shared_b, const Tensor& task_a,
                              const Tensor& task_b, double scaling, const std::optional<Tensor>& task_cluster,
                              bool per_token_gates, const std::optional<Tensor>& keep_mask,
                              double dropout_p) {
  check(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, d_in] tensor");
  check(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  check(shared_a.dim() == 3 && task_a.dim() == 3 && gates.dim() == 2 && task_b.dim() == 3,
        "experts must be 3-D and gates 2-D");
  cgc_ref::Problem p;
  p.M = x.size(0);
  p.d_in = x.size(1);
  p.C = shared_a.size(0);
  p.T = task_a.size(0);
  p.d_out = task_b.size(1);
  const int64_t E = gates.size(1), Sr = shared_a.size(1), Kr = task_a.size(1);
  check(E >= 1 && (Sr + Kr) % E == 0 && (Sr + Kr) / E >= 1, "gates columns must be S+K");
  p.r = (Sr + Kr) / E;
  check(Sr % p.r == 0 && Kr % p.r == 0, "S*r and K*r must be multiples of r");
  p.S = Sr / p.r;
  p.K = Kr / p.r;
  check_float(shared_a, x, "shared_a", {p.C, Sr, p.d_in});
  check_float(shared_b, x, "shared_b", {p.C, p.d_out, Sr});
  check_float(task_a, x, "task_a", {p.T, Kr, p.d_in});
  check_float(task_b, x, "task_b", {p.T, p.d_out, Kr});
  check_float(gates, x, "gates", {per_token_gates ? p.M : p.T, E});
  check(task_ids.scalar_type() == at::kLong && task_ids.is_contiguous() && task_ids.dim() == 1 &&
            task_ids.size(0) == p.M && task_ids.device() == x.device(),
        "task_ids must be a contiguous int64 [M] tensor on x's device");
  p.task_ids = task_ids.data_ptr<int64_t>();
  if (task_cluster.has_value()) {
    const Tensor& tc = *task_cluster;
    check(tc.scalar_type() == at::kLong && tc.is_contiguous() && tc.dim() == 1 && tc.size(0) == p.T &&
              tc.device() == x.device(),
          "task_cluster must be a contiguous int64 [T] tensor on x's device");
    p.task_cluster = tc.data_ptr<int64_t>();
  } else {
    check(p.C == 1, "task_cluster is required when there are several clusters");
  }
  if (keep_mask.has_value()) {
    const Tensor& km = *keep_mask;
    check(km.scalar_type() == at::kByte && km.is_contiguous() && km.sizes() == x.sizes() &&
              km.device() == x.device(),
          "keep_mask must be a contiguous uint8 [M, d_in] tensor on x's device");
    p.keep = km.data_ptr<uint8_t>();
  }
  check(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must lie in [0, 1)");
  p.inv_keep = 1.0 / (1.0 - dropout_p);
  p.scaling = scaling;
  p.per_token_gates = per_token_gates;
  return p;
}

template <typename scalar_t>
cgc_ref::Experts<scalar_t> experts(const Tensor& gates, const Tensor& sa, const Tensor& sb, const Tensor& ta,
                                   const Tensor& tb) {
  return {sa.data_ptr<scalar_t>(), sb.data_ptr<scalar_t>(), ta.data_ptr<scalar_t>(), tb.data_ptr<scalar_t>(),
          gates.data_ptr<scalar_t>()};
}

// Host-side ids are read by the loops: they must lie in range (the Python wrapper checks them).
void check_cpu_ids(const cgc_ref::Problem& p) {
  for (int64_t m = 0; m < p.M; ++m) check(p.task_ids[m] >= -1 && p.task_ids[m] < p.T, "task id out of range");
  if (p.task_cluster)
    for (int64_t t = 0; t < p.T; ++t)
      check(p.task_cluster[t] >= 0 && p.task_cluster[t] < p.C, "task_cluster value out of range");
}

Tensor forward_cpu(const Tensor& x, const Tensor& task_ids, const Tensor& gates, const Tensor& shared_a,
                   const Tensor& shared_b, const Tensor& task_a, const Tensor& task_b, double scaling,
                   const std::optional<Tensor>& task_cluster, bool per_token_gates,
                   const std::optional<Tensor>& keep_mask, double dropout_p, int64_t num_threads) {
  check(x.device().is_cpu(), "forward_cpu takes CPU tensors");
  cgc_ref::Problem p = make_problem(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
                                    task_cluster, per_token_gates, keep_mask, dropout_p);
  check_cpu_ids(p);
  p.num_threads = static_cast<int>(num_threads < 1 ? 1 : num_threads);
  Tensor out = at::empty({p.M, p.d_out}, x.options());
  if (x.scalar_type() == at::kDouble) {
    cgc_ref::forward<double>(p, x.data_ptr<double>(), experts<double>(gates, shared_a, shared_b, task_a, task_b),
                             out.data_ptr<double>());
  } else {
    cgc_ref::forward<float>(p, x.data_ptr<float>(), experts<float>(gates, shared_a, shared_b, task_a, task_b),
                            out.data_ptr<float>());
  }
  return out;
}

// Returns (dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b), each shaped like its input.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& task_ids, const Tensor& gates, const Tensor& shared_a,
    const Tensor& shared_b, const Tensor& task_a, const Tensor& task_b, double scaling,
    const std::optional<Tensor>& task_cluster, bool per_token_gates, const std::optional<Tensor>& keep_mask,
    double dropout_p, int64_t num_threads) {
  check(x.device().is_cpu(), "backward_cpu takes CPU tensors");
  cgc_ref::Problem p = make_problem(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
                                    task_cluster, per_token_gates, keep_mask, dropout_p);
  check_cpu_ids(p);
  check_float(dy, x, "dy", {p.M, p.d_out});
  p.num_threads = static_cast<int>(num_threads < 1 ? 1 : num_threads);
  Tensor dx = at::empty_like(x), dg = at::empty_like(gates), dsa = at::empty_like(shared_a),
         dsb = at::empty_like(shared_b), dta = at::empty_like(task_a), dtb = at::empty_like(task_b);
  if (x.scalar_type() == at::kDouble) {
    cgc_ref::backward<double>(p, dy.data_ptr<double>(), x.data_ptr<double>(),
                              experts<double>(gates, shared_a, shared_b, task_a, task_b),
                              {dx.data_ptr<double>(), dg.data_ptr<double>(), dsa.data_ptr<double>(),
                               dsb.data_ptr<double>(), dta.data_ptr<double>(), dtb.data_ptr<double>()});
  } else {
    cgc_ref::backward<float>(p, dy.data_ptr<float>(), x.data_ptr<float>(),
                             experts<float>(gates, shared_a, shared_b, task_a, task_b),
                             {dx.data_ptr<float>(), dg.data_ptr<float>(), dsa.data_ptr<float>(),
                              dsb.data_ptr<float>(), dta.data_ptr<float>(), dtb.data_ptr<float>()});
  }
  return {dx, dg, dsa, dsb, dta, dtb};
}

#ifdef CGC_REF_WITH_CUDA
// The C launcher of cgc_lora_ref.cu (no CUDA headers needed here).
extern "C" int cgc_lora_ref_forward_cuda(int is_double, const void* x, const int64_t* task_ids, const void* gates,
                                         const void* shared_a, const void* shared_b, const void* task_a,
                                         const void* task_b, const int64_t* task_cluster, const uint8_t* keep_mask,
                                         void* out, int64_t M, int64_t d_in, int64_t d_out, int64_t S, int64_t K,
                                         int64_t r, int per_token_gates, double scaling, double inv_keep,
                                         void* stream);
extern "C" const char* cgc_lora_ref_cuda_error_string(int code);

// `stream`: the cudaStream_t to launch on, as an integer (torch.cuda.current_stream().cuda_stream).
// Task ids and clusters must already be range-checked: the kernel trusts them.
Tensor forward_cuda(const Tensor& x, const Tensor& task_ids, const Tensor& gates, const Tensor& shared_a,
                    const Tensor& shared_b, const Tensor& task_a, const Tensor& task_b, double scaling,
                    const std::optional<Tensor>& task_cluster, bool per_token_gates,
                    const std::optional<Tensor>& keep_mask, double dropout_p, int64_t stream) {
  check(x.device().is_cuda(), "forward_cuda takes CUDA tensors");
  cgc_ref::Problem p = make_problem(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
                                    task_cluster, per_token_gates, keep_mask, dropout_p);
  Tensor out = at::empty({p.M, p.d_out}, x.options());
  const int code = cgc_lora_ref_forward_cuda(
      x.scalar_type() == at::kDouble, x.data_ptr(), p.task_ids, gates.data_ptr(), shared_a.data_ptr(),
      shared_b.data_ptr(), task_a.data_ptr(), task_b.data_ptr(), p.task_cluster, p.keep, out.data_ptr(), p.M,
      p.d_in, p.d_out, p.S, p.K, p.r, p.per_token_gates, p.scaling, p.inv_keep,
      reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(code == 0, "cgc_lora_ref CUDA forward failed: ", cgc_lora_ref_cuda_error_string(code));
  return out;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CGC-LoRA C++ reference: forward and backward on CPU, forward on CUDA";
  m.def("forward_cpu", &forward_cpu, "delta [M, d_out]");
  m.def("backward_cpu", &backward_cpu, "(dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b)");
#ifdef CGC_REF_WITH_CUDA
  m.def("forward_cuda", &forward_cuda, "delta [M, d_out] on the GPU");
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
#endif  // CGC_REF_NO_TORCH
