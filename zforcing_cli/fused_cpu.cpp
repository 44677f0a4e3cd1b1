// The recurrence's two loops (recurrence.py's `rollout` and `backpropagate`) as one C++
// function each, for the CPU. Same inputs, same buffers, same arithmetic; what changes is the
// cost of a step. The Python loops call about a dozen torch operations per step, each paying
// the interpreter and the dispatcher (several microseconds) for a few thousand numbers of
// work; at 64 units and 784 steps that overhead is most of the loop. Here each step makes three
// matrix products and three vectorised transcendentals through ATen, on scratch tensors made
// once, and does every other elementwise operation in plain loops over the rows, fused, reading
// and writing the time-major buffers in place.
//
// Compiled on first use by fused_cpu.py (no ninja, no Python headers: the functions are
// registered as torch operators, torch.ops.zforcing_fused_cpu.rollout / .backpropagate).
// Built with -ffp-contract=off so that a * b + c is rounded as written, whatever the compiler
// and machine: the same inputs give the same bits.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::Tensor;

template <typename T>
inline T clamp_to(T x, T bound) {  // NaN passes through, as torch.clamp lets it
  return x < -bound ? -bound : (x > bound ? bound : x);
}

// Slope of clamp(leaky_relu(x), ±clip), read from its output: 0 where clipped (|output| = clip
// counts as clipped, as recurrence.clipped_leaky_relu_backward has it), 1 above zero, leak below.
template <typename T>
inline T hidden_slope(T output, T leak, T clip) {
  if (output <= -clip || output >= clip) return T(0);
  return output > T(0) ? T(1) : leak;
}

// torch's intra-op thread count set for a scope, and restored at its end however it ends.
struct ThreadCount {
  int before;
  explicit ThreadCount(int64_t threads) : before(at::get_num_threads()) {
    if (threads > 0 && threads != before) at::set_num_threads(static_cast<int>(threads));
  }
  ~ThreadCount() {
    if (at::get_num_threads() != before) at::set_num_threads(before);
  }
};

struct Sizes {
  int64_t batch, steps, size, gates, mlp, latent, from_h;
};

Sizes sizes_of(const Tensor& input_gates, const Tensor& post_in, const Tensor& noise) {
  TORCH_CHECK(input_gates.dim() == 3 && post_in.dim() == 3 && noise.dim() == 3, "inputs must be (B, T, ·)");
  Sizes s;
  s.batch = input_gates.size(0);
  s.steps = input_gates.size(1);
  s.gates = input_gates.size(2);
  TORCH_CHECK(s.gates % 4 == 0, "input_gates must have 4H columns");
  s.size = s.gates / 4;
  s.mlp = post_in.size(2);
  s.latent = noise.size(2);
  s.from_h = s.gates + s.mlp;
  return s;
}

// The fused elementwise parts of a step, one row of the batch at a time. Their pointers do not
// alias (__restrict__), so the compiler vectorises each loop; the ternaries become blends.

template <typename T>
void hidden_row(const T* __restrict__ from_h_post, const T* __restrict__ post, T* __restrict__ hidden,
                T* __restrict__ hidden_kept, int64_t n, T leak, T clip) {
  for (int64_t m = 0; m < n; ++m) {  // clamp(lrelu(a_t)), a_t = the h part + post_in_t
    T a = from_h_post[m] + post[m];
    T v = clamp_to(a > T(0) ? a : a * leak, clip);
    hidden[m] = v;
    hidden_kept[m] = v;
  }
}

template <typename T>
void stats_row(const T* __restrict__ raw, T* __restrict__ raw_kept, T* __restrict__ stats, int64_t n, T clamp) {
  for (int64_t k = 0; k < n; ++k) {
    raw_kept[k] = raw[k];
    stats[k] = clamp_to(raw[k], clamp);
  }
}

template <typename T>
void sample_row(const T* __restrict__ stats, const T* __restrict__ eps, T* __restrict__ z, T* __restrict__ z_kept,
                int64_t n) {
  for (int64_t k = 0; k < n; ++k) {  // the reparameterised sample z_t = mean + exp(logvar / 2) eps_t
    T value = stats[k] + std::exp(stats[n + k] * T(0.5)) * eps[k];
    z[k] = value;
    z_kept[k] = value;
  }
}

template <typename T>
void add_row(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] + b[j];
}

template <typename T>
void add_into_row(const T* __restrict__ a, T* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] + out[j];
}

template <typename T>
void copy_row(const T* __restrict__ from, T* __restrict__ to, int64_t n) {
  for (int64_t j = 0; j < n; ++j) to[j] = from[j];
}

template <typename T>
void cell_row(const T* __restrict__ sig, const T* __restrict__ tanh_g, const T* __restrict__ c_prev,
              T* __restrict__ act, T* __restrict__ cell, T* __restrict__ cell_kept, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {  // c_t = f c_{t-1} + i g
    T i = sig[k], f = sig[n + k], g = tanh_g[k], o = sig[3 * n + k];
    act[k] = i;
    act[n + k] = f;
    act[2 * n + k] = g;
    act[3 * n + k] = o;
    T c = f * c_prev[k];
    c = c + i * g;
    cell[k] = c;
    cell_kept[k] = c;
  }
}

template <typename T>
void state_row(const T* __restrict__ o, const T* __restrict__ tanh_cell, T* __restrict__ tanh_kept,
               T* __restrict__ h, T* __restrict__ h_kept, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {  // h_t = o tanh(c_t)
    T tc = tanh_cell[k];
    T value = o[k] * tc;
    tanh_kept[k] = tc;
    h[k] = value;
    h_kept[k] = value;
  }
}

template <typename T>
void forward_loop(const Sizes& s, const T* gates_in, const T* post_in, const T* noise, const Tensor& from_h_weight_t,
                  const Tensor& z_weight_t, const Tensor& out_weight_t, const Tensor& out_bias_rows, T clamp, T leak,
                  T clip, T* states, T* cells, T* activations, T* tanh_cells, T* hiddens, T* raw_stats, T* stats,
                  T* zs) {
  const int64_t B = s.batch, TT = s.steps, H = s.size, G = s.gates, M = s.mlp, Z = s.latent, F = s.from_h;
  auto options = from_h_weight_t.options();
  // Scratch for the products and the transcendentals: the same tensors at every step.
  Tensor h_scratch = at::zeros({B, H}, options);
  Tensor from_h = at::empty({B, F}, options);
  Tensor hidden = at::empty({B, M}, options);
  Tensor raw = at::empty({B, 2 * Z}, options);
  Tensor z = at::empty({B, Z}, options);
  Tensor gates = at::empty({B, G}, options);
  Tensor sig = at::empty({B, G}, options);
  Tensor tanh_g = at::empty({B, H}, options);
  Tensor cell = at::empty({B, H}, options);
  Tensor tanh_cell = at::empty({B, H}, options);
  T* h_p = h_scratch.data_ptr<T>();
  const T* fh = from_h.data_ptr<T>();
  T* hid_p = hidden.data_ptr<T>();
  const T* raw_p = raw.data_ptr<T>();
  T* z_p = z.data_ptr<T>();
  T* gates_p = gates.data_ptr<T>();
  const T* sig_p = sig.data_ptr<T>();
  T* tg_p = tanh_g.data_ptr<T>();
  T* cell_p = cell.data_ptr<T>();
  const T* tc_p = tanh_cell.data_ptr<T>();
  for (int64_t j = 0; j < B * H; ++j) states[j] = cells[j] = T(0);

  for (int64_t t = 0; t < TT; ++t) {
    const T* c_prev = cells + t * B * H;
    T* h_next = states + (t + 1) * B * H;
    T* c_next = cells + (t + 1) * B * H;
    T* act = activations + t * B * G;
    T* tanh_c = tanh_cells + t * B * H;
    T* hid_t = hiddens + t * B * M;
    T* raw_t = raw_stats + t * B * 2 * Z;
    T* stats_t = stats + t * B * 2 * Z;
    T* z_t = zs + t * B * Z;

    at::mm_out(from_h, h_scratch, from_h_weight_t);  // h_{t-1} [W_hh; W_post,h]^T
    for (int64_t b = 0; b < B; ++b)
      hidden_row(fh + b * F + G, post_in + (b * TT + t) * M, hid_p + b * M, hid_t + b * M, M, leak, clip);
    at::addmm_out(raw, out_bias_rows, hidden, out_weight_t);  // q's [mean, logvar] before the clamp
    for (int64_t b = 0; b < B; ++b) {
      stats_row(raw_p + b * 2 * Z, raw_t + b * 2 * Z, stats_t + b * 2 * Z, 2 * Z, clamp);
      sample_row(stats_t + b * 2 * Z, noise + (b * TT + t) * Z, z_p + b * Z, z_t + b * Z, Z);
    }
    // The gates: gates_in_t + the h part + z_t W_z^T.
    for (int64_t b = 0; b < B; ++b) add_row(gates_in + (b * TT + t) * G, fh + b * F, gates_p + b * G, G);
    at::addmm_out(gates, gates, z, z_weight_t);
    at::sigmoid_out(sig, gates);  // i, f, o (and g's, unused)
    for (int64_t b = 0; b < B; ++b) copy_row(gates_p + b * G + 2 * H, tg_p + b * H, H);
    at::tanh_out(tanh_g, tanh_g);
    for (int64_t b = 0; b < B; ++b)
      cell_row(sig_p + b * G, tg_p + b * H, c_prev + b * H, act + b * G, cell_p + b * H, c_next + b * H, H);
    at::tanh_out(tanh_cell, cell);
    for (int64_t b = 0; b < B; ++b)
      state_row(act + b * G + 3 * H, tc_p + b * H, tanh_c + b * H, h_p + b * H, h_next + b * H, H);
  }
}

std::vector<Tensor> rollout(const Tensor& input_gates_, const Tensor& post_in_, const Tensor& noise_,
                            const Tensor& from_h_weight, const Tensor& z_weight, const Tensor& out_weight,
                            const Tensor& out_bias, double clamp, double leak, double clip) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor input_gates = input_gates_.contiguous(), post_in = post_in_.contiguous(), noise = noise_.contiguous();
  const Sizes s = sizes_of(input_gates, post_in, noise);
  TORCH_CHECK(from_h_weight.size(0) == s.from_h && from_h_weight.size(1) == s.size, "from_h_weight must be (4H+M, H)");
  auto options = input_gates.options();
  const int64_t B = s.batch, TT = s.steps, H = s.size, G = s.gates, M = s.mlp, Z = s.latent;
  Tensor states = at::empty({TT + 1, B, H}, options), cells = at::empty({TT + 1, B, H}, options);
  Tensor activations = at::empty({TT, B, G}, options), tanh_cells = at::empty({TT, B, H}, options);
  Tensor hiddens = at::empty({TT, B, M}, options);
  Tensor raw_stats = at::empty({TT, B, 2 * Z}, options), stats = at::empty({TT, B, 2 * Z}, options);
  Tensor zs = at::empty({TT, B, Z}, options);
  // Contiguous transposes: MKL multiplies 32 rows by them faster than by the transposed views.
  Tensor from_h_weight_t = from_h_weight.t().contiguous(), z_weight_t = z_weight.t().contiguous();
  Tensor out_weight_t = out_weight.t().contiguous(), out_bias_rows = out_bias.expand({B, 2 * Z});
  AT_DISPATCH_FLOATING_TYPES(input_gates.scalar_type(), "zforcing_fused_cpu.rollout", [&] {
    forward_loop<scalar_t>(s, input_gates.data_ptr<scalar_t>(), post_in.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
                           from_h_weight_t, z_weight_t, out_weight_t, out_bias_rows, scalar_t(clamp), scalar_t(leak),
                           scalar_t(clip), states.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(),
                           activations.data_ptr<scalar_t>(), tanh_cells.data_ptr<scalar_t>(), hiddens.data_ptr<scalar_t>(),
                           raw_stats.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), zs.data_ptr<scalar_t>());
  });
  return {states, cells, activations, tanh_cells, hiddens, raw_stats, stats, zs};
}

template <typename T>
void gates_row(const T* __restrict__ act, const T* __restrict__ c_prev, const T* __restrict__ tanh_c,
               const T* __restrict__ dh, T* __restrict__ dc_next, T* __restrict__ d, int64_t n) {
  // dh_t is complete: the gates' gradients, and dc_t. (sigmoid' = s(1 - s), tanh' = 1 - t².)
  const T one = T(1);
  for (int64_t k = 0; k < n; ++k) {
    T i = act[k], f = act[n + k], g = act[2 * n + k], o = act[3 * n + k], tc = tanh_c[k], dhv = dh[k];
    T dc = dc_next[k] + dhv * (o * (one - tc * tc));
    d[k] = (g * (one - i) * i) * dc;
    d[n + k] = (c_prev[k] * (one - f) * f) * dc;
    d[2 * n + k] = (i * (one - g * g)) * dc;
    d[3 * n + k] = (tc * (one - o) * o) * dhv;
    dc_next[k] = dc * f;
  }
}

template <typename T>
void latent_row(const T* __restrict__ dz_product, const T* __restrict__ dz_given, const T* __restrict__ raw,
                const T* __restrict__ eps, const T* __restrict__ sd, const T* __restrict__ d_mean,
                const T* __restrict__ d_logvar, T* __restrict__ ds, T* __restrict__ ds_kept, T* __restrict__ d_noise,
                int64_t n, T clamp) {
  // dz_t in full, then q's statistics: d[mean, logvar] = given + dz [1, eps std / 2], where the
  // clamp let them through; and d eps_t = dz_t std.
  const T one = T(1), zero = T(0);
  for (int64_t k = 0; k < n; ++k) {
    T dz = dz_product[k] + dz_given[k];
    T mean_passes = (raw[k] >= -clamp && raw[k] <= clamp) ? one : zero;
    T logvar_passes = (raw[n + k] >= -clamp && raw[n + k] <= clamp) ? one : zero;
    T dm = d_mean[k] * mean_passes + dz * mean_passes;
    T dl = d_logvar[k] * logvar_passes + dz * (T(0.5) * eps[k] * sd[k] * logvar_passes);
    ds[k] = dm;
    ds[n + k] = dl;
    ds_kept[k] = dm;
    ds_kept[n + k] = dl;
    d_noise[k] = dz * sd[k];
  }
}

template <typename T>
void hidden_grad_row(const T* __restrict__ from_stats, const T* __restrict__ hidden, T* __restrict__ d, int64_t n,
                     T leak, T clip) {
  for (int64_t m = 0; m < n; ++m) d[m] = from_stats[m] * hidden_slope(hidden[m], leak, clip);
}

template <typename T>
void backward_loop(const Sizes& s, const T* cells, const T* activations, const T* tanh_cells, const T* hiddens,
                   const T* raw_stats, const T* noise, const T* stds, const Tensor& from_h_weight,
                   const Tensor& z_weight, const Tensor& out_weight, const T* d_states, const T* d_z,
                   const T* d_mean, const T* d_logvar, const T* d_cell_last, T clamp, T leak, T clip, T* d_from_h_all,
                   T* d_stats_all, T* d_noise) {
  const int64_t B = s.batch, TT = s.steps, H = s.size, G = s.gates, M = s.mlp, Z = s.latent, F = s.from_h;
  auto options = from_h_weight.options();
  Tensor d_from_h = at::empty({B, F}, options);
  Tensor d_gates = d_from_h.narrow(1, 0, G);  // rows of F: MKL reads them with a leading dimension
  Tensor dz_product = at::empty({B, Z}, options);
  Tensor d_stats = at::empty({B, 2 * Z}, options);
  Tensor from_stats = at::empty({B, M}, options);
  Tensor dh = at::empty({B, H}, options);
  std::vector<T> dc_next(d_cell_last, d_cell_last + B * H);  // dc_{t+1} f_{t+1}
  T* dfh = d_from_h.data_ptr<T>();
  const T* dzp = dz_product.data_ptr<T>();
  T* ds = d_stats.data_ptr<T>();
  const T* fs = from_stats.data_ptr<T>();
  T* dh_p = dh.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)  // dL/dh_T, the loss's own
    copy_row(d_states + (b * (TT + 1) + TT) * H, dh_p + b * H, H);

  for (int64_t t = TT - 1; t >= 0; --t) {
    const T* act = activations + t * B * G;
    const T* c_prev = cells + t * B * H;
    const T* tanh_c = tanh_cells + t * B * H;
    const T* hid = hiddens + t * B * M;
    const T* raw = raw_stats + t * B * 2 * Z;
    const T* std_t = stds + t * B * Z;
    T* dfh_t = d_from_h_all + t * B * F;
    T* ds_t = d_stats_all + t * B * 2 * Z;
    for (int64_t b = 0; b < B; ++b)
      gates_row(act + b * G, c_prev + b * H, tanh_c + b * H, dh_p + b * H, dc_next.data() + b * H, dfh + b * F, H);
    at::mm_out(dz_product, d_gates, z_weight);  // d gates W_z
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = (b * TT + t) * Z;
      latent_row(dzp + b * Z, d_z + row, raw + b * 2 * Z, noise + row, std_t + b * Z, d_mean + row, d_logvar + row,
                 ds + b * 2 * Z, ds_t + b * 2 * Z, d_noise + row, Z, clamp);
    }
    at::mm_out(from_stats, d_stats, out_weight);  // back through the posterior's output layer
    for (int64_t b = 0; b < B; ++b) hidden_grad_row(fs + b * M, hid + b * M, dfh + b * F + G, M, leak, clip);
    copy_row(dfh, dfh_t, B * F);
    at::mm_out(dh, d_from_h, from_h_weight);  // through [W_hh; W_post,h]: dL/dh_{t-1} ...
    for (int64_t b = 0; b < B; ++b)  // ... plus the loss's own
      add_into_row(d_states + (b * (TT + 1) + t) * H, dh_p + b * H, H);
  }
}

std::vector<Tensor> backpropagate(const Tensor& states, const Tensor& cells_, const Tensor& activations_,
                                  const Tensor& tanh_cells_, const Tensor& hidden_, const Tensor& raw_stats_,
                                  const Tensor& stats, const Tensor& zs, const Tensor& noise_,
                                  const Tensor& from_h_weight_, const Tensor& z_weight_, const Tensor& out_weight_,
                                  const Tensor& d_states_, const Tensor& d_z_, const Tensor& d_mean_,
                                  const Tensor& d_logvar_, const Tensor& d_cell_last_, double clamp, double leak,
                                  double clip, int64_t loop_threads) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor cells = cells_.contiguous(), activations = activations_.contiguous(), tanh_cells = tanh_cells_.contiguous();
  Tensor hidden = hidden_.contiguous(), raw_stats = raw_stats_.contiguous(), noise = noise_.contiguous();
  Tensor from_h_weight = from_h_weight_.contiguous(), z_weight = z_weight_.contiguous(), out_weight = out_weight_.contiguous();
  Tensor d_states = d_states_.contiguous(), d_z = d_z_.contiguous(), d_mean = d_mean_.contiguous();
  Tensor d_logvar = d_logvar_.contiguous(), d_cell_last = d_cell_last_.contiguous();
  const int64_t TT = activations.size(0), B = activations.size(1), G = activations.size(2);
  Sizes s;
  s.batch = B;
  s.steps = TT;
  s.gates = G;
  s.size = G / 4;
  s.latent = zs.size(2);
  s.mlp = hidden.size(2);
  s.from_h = G + s.mlp;
  const int64_t H = s.size, M = s.mlp, Z = s.latent, F = s.from_h;
  auto options = activations.options();
  Tensor stds = at::exp(stats.narrow(2, Z, Z) * 0.5).contiguous();  // (T, B, Z), for all steps at once
  Tensor d_from_h = at::empty({TT, B, F}, options);  // [d gates, d a_t] per step
  Tensor d_stats = at::empty({TT, B, 2 * Z}, options);
  Tensor d_noise = at::empty({B, TT, Z}, options);
  // The loop on loop_threads threads (one at small widths: see steps.step_threads); the
  // products after it on all of torch's.
  AT_DISPATCH_FLOATING_TYPES(activations.scalar_type(), "zforcing_fused_cpu.backpropagate", [&] {
    ThreadCount threads(loop_threads);
    backward_loop<scalar_t>(s, cells.data_ptr<scalar_t>(), activations.data_ptr<scalar_t>(), tanh_cells.data_ptr<scalar_t>(),
                            hidden.data_ptr<scalar_t>(), raw_stats.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
                            stds.data_ptr<scalar_t>(), from_h_weight, z_weight, out_weight, d_states.data_ptr<scalar_t>(),
                            d_z.data_ptr<scalar_t>(), d_mean.data_ptr<scalar_t>(), d_logvar.data_ptr<scalar_t>(),
                            d_cell_last.data_ptr<scalar_t>(), scalar_t(clamp), scalar_t(leak), scalar_t(clip),
                            d_from_h.data_ptr<scalar_t>(), d_stats.data_ptr<scalar_t>(), d_noise.data_ptr<scalar_t>());
  });
  // Each weight gradient: one product over all B·T rows.
  const int64_t rows = TT * B;
  Tensor d_from_h_rows = d_from_h.view({rows, F}), d_stats_rows = d_stats.view({rows, 2 * Z});
  Tensor d_from_h_weight = d_from_h_rows.t().mm(states.narrow(0, 0, TT).reshape({rows, H}));
  Tensor d_z_weight = d_from_h_rows.narrow(1, 0, G).t().mm(zs.reshape({rows, Z}));
  Tensor d_out_weight = d_stats_rows.t().mm(hidden.view({rows, M}));
  Tensor d_out_bias = d_stats_rows.sum(0);
  return {d_from_h.narrow(2, 0, G).transpose(0, 1), d_from_h.narrow(2, G, M).transpose(0, 1), d_noise,
          d_from_h_weight, d_z_weight, d_out_weight, d_out_bias};
}

}  // namespace

TORCH_LIBRARY(zforcing_fused_cpu, m) {
  m.def("rollout(Tensor input_gates, Tensor post_in, Tensor noise, Tensor from_h_weight, Tensor z_weight, "
        "Tensor out_weight, Tensor out_bias, float clamp, float leak, float clip) -> Tensor[]",
        &rollout);
  m.def("backpropagate(Tensor states, Tensor cells, Tensor activations, Tensor tanh_cells, Tensor hidden, "
        "Tensor raw_stats, Tensor stats, Tensor zs, Tensor noise, Tensor from_h_weight, Tensor z_weight, "
        "Tensor out_weight, Tensor d_states, Tensor d_z, Tensor d_mean, Tensor d_logvar, Tensor d_cell_last, "
        "float clamp, float leak, float clip, int loop_threads) -> Tensor[]",
        &backpropagate);
}
