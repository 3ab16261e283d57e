// Native CPU streaming step of EventSSM: a Python extension module built and loaded by
// models/native.py.
//
// Computes exactly what EventSSM.__call__ computes at inference (models/model.py, models/ssm.py,
// models/pooling.py) for B sessions, one packet each, on the packed state rows of
// models/streaming.py::StateLayout. The mathematics is documented there; this file only orders
// the work for a CPU:
//
//   * every recurrence runs event by event, s_i = Lambda_bar_i s_{i-1} + gain_i B~u_i, over the
//     P' complex states as separate real and imaginary vectors (the XLA path folds events into
//     blocks instead, which is the same map);
//   * the first layer's inputs are rows of per-token tables (B~u with the gain folded in, the
//     pooling input [u, x], and the decays of integer microsecond gaps), read once per event;
//   * rows of all sessions that reach a layer (events, or completed windows of a strided layer)
//     are stacked, so each weight matrix is read once per layer and call, by register-tiled
//     matrix products;
//   * a layer that no session reaches is skipped: its state, and every deeper one, is unchanged;
//   * a second thread takes half of each product, and of the recurrences (by session, by state
//     columns, or for one session's first layer, by role).
//
// The weights (one float32 buffer) and the plan (int32 offsets into it and into a state row)
// are built by models/native.py, which reads the plan's layout from plan_layout() below: the
// field lists here are its one definition.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>
#include <type_traits>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// --- plan layout ---------------------------------------------------------------------------
// A plan is H_FIELDS header words, then L_FIELDS words per layer; a field not used by a model
// is -1. Each list names a field's enumerator and the name models/native.py fills it by, in
// plan order; plan_layout() hands the names, counts and kVersion to Python. A change of the
// layout bumps kVersion.
#define EVSSM_HEADER_FIELDS(X)                                                                 \
  X(H_VERSION, version) X(H_LAYERS, layers) X(H_WORDS, words) X(H_PRENORM, prenorm)           \
  X(H_NORM, norm) X(H_POOL, pool) X(H_HEAD, head) X(H_CLASSES, classes) X(H_WIDTH, width)     \
  X(H_HEAD_W, head_w) X(H_HEAD_B, head_b) X(H_SUM_Z, sum_z) X(H_SUM_W, sum_w)                 \
  X(H_LAST_Z, last_z) X(H_COUNT, count) X(H_ZOH, zoh) X(H_VOCAB, vocab)                       \
  X(H_DECAY_SIZE, decay_size) X(H_TABLE_BU, table_bu) X(H_TABLE_POOL, table_pool)             \
  X(H_TABLE_DECAY, table_decay) X(H_CONSTS, consts) X(H_GELU, gelu) X(H_HELD, held)           \
  X(H_HEAD_SUM_DT, head_sum_dt) X(H_SUM_Z_C, sum_z_c) X(H_SUM_W_C, sum_w_c)                   \
  X(H_HEAD_SUM_DT_C, head_sum_dt_c)
#define EVSSM_LAYER_FIELDS(X)                                                                  \
  X(L_DIN, d_in) X(L_DOUT, d_out) X(L_P, p) X(L_STRIDE, stride) X(L_S_LAST, s_last)           \
  X(L_S_FIRST, s_first) X(L_SUM_WX, sum_wx) X(L_SUM_W, sum_w) X(L_SUM_DT, sum_dt)             \
  X(L_COUNT, count) X(L_NORM_A, norm_a) X(L_NORM_B, norm_b) X(L_B, b) X(L_STEP, step)         \
  X(L_INV_LAMBDA, inv_lambda) X(L_C, c) X(L_D, d) X(L_D_MATRIX, d_matrix) X(L_GATE_W, gate_w) \
  X(L_GATE_B, gate_b) X(L_SKIP_W, skip_w) X(L_SKIP_B, skip_b) X(L_DPOOL, d_pool)
#define EVSSM_ENUMERATOR(id, name) id,
#define EVSSM_NAME(id, name) #name,
enum Header { EVSSM_HEADER_FIELDS(EVSSM_ENUMERATOR) H_NAMED, H_FIELDS = 32 };
enum Layer { EVSSM_LAYER_FIELDS(EVSSM_ENUMERATOR) L_NAMED, L_FIELDS = 24 };
static_assert(H_NAMED <= H_FIELDS && L_NAMED <= L_FIELDS, "a plan field beyond its block");
constexpr const char* kHeaderNames[] = {EVSSM_HEADER_FIELDS(EVSSM_NAME)};
constexpr const char* kLayerNames[] = {EVSSM_LAYER_FIELDS(EVSSM_NAME)};
constexpr int kVersion = 3;
// The choices a header field codes, by their names in models/config.py, in code order.
#define EVSSM_POOL_MODES(X) X(POOL_FIRST, first) X(POOL_AVG, avgpool) X(POOL_TIME, timepool)
#define EVSSM_HEAD_MODES(X) X(HEAD_POOL, pool) X(HEAD_TIME, timepool) X(HEAD_LAST, last)
#define EVSSM_NORMS(X) X(NORM_LAYER, layer) X(NORM_BATCH, batch)
#define EVSSM_GELUS(X) X(GELU_ERF, erf) X(GELU_TANH, tanh)
enum PoolMode { EVSSM_POOL_MODES(EVSSM_ENUMERATOR) POOL_MODES };
enum HeadMode { EVSSM_HEAD_MODES(EVSSM_ENUMERATOR) HEAD_MODES };
enum Norm { EVSSM_NORMS(EVSSM_ENUMERATOR) NORMS };
enum Gelu { EVSSM_GELUS(EVSSM_ENUMERATOR) GELUS };
constexpr const char* kPoolModeNames[] = {EVSSM_POOL_MODES(EVSSM_NAME)};
constexpr const char* kHeadModeNames[] = {EVSSM_HEAD_MODES(EVSSM_NAME)};
constexpr const char* kNormNames[] = {EVSSM_NORMS(EVSSM_NAME)};
constexpr const char* kGeluNames[] = {EVSSM_GELUS(EVSSM_NAME)};

// --- small dense kernels ------------------------------------------------------------------------
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// C[R rows, 8V cols] (+)= A[R, K] W[K, 8V cols] for one register tile.
template <int R, int V>
inline void tile(const float* a, int lda, int k_len, const float* w, int ldw, float* c, int ldc,
                 const float* bias, bool accumulate) {
  v8 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? load8(c + r * ldc + 8 * v) : bias ? load8(bias + 8 * v) : splat(0.f);
  for (int k = 0; k < k_len; ++k) {
    v8 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load8(w + (size_t)k * ldw + 8 * v);
    for (int r = 0; r < R; ++r) {
      const v8 x = splat(a[r * lda + k]);
      for (int v = 0; v < V; ++v) acc[r][v] += x * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store8(c + r * ldc + 8 * v, acc[r][v]);
}

// C[M, N] = A[M, K] W[K, N] (+ bias[N]), or C += A W with accumulate. Row strides lda, ldw, ldc.
void matmul_serial(const float* a, int lda, int m, int k, const float* w, int ldw, int n, float* c,
                   int ldc, const float* bias, bool accumulate) {
  int col = 0;
  // Few rows (the deeper layers see one or two windows per packet): wide tiles, so the weight
  // stream, not the FMA latency chain, bounds the product.
  if (m < 4) {
    for (; col + 64 <= n; col += 64)
      for (int r = 0; r < m; ++r)
        tile<1, 8>(a + r * lda, lda, k, w + col, ldw, c + r * ldc + col, ldc,
                   bias ? bias + col : nullptr, accumulate);
  }
  for (; col + 16 <= n; col += 16) {
    int r = 0;
    for (; r + 6 <= m; r += 6)
      tile<6, 2>(a + r * lda, lda, k, w + col, ldw, c + r * ldc + col, ldc,
                 bias ? bias + col : nullptr, accumulate);
    for (; r + 4 <= m; r += 4)
      tile<4, 2>(a + r * lda, lda, k, w + col, ldw, c + r * ldc + col, ldc,
                 bias ? bias + col : nullptr, accumulate);
    for (; r < m; ++r)
      tile<1, 2>(a + r * lda, lda, k, w + col, ldw, c + r * ldc + col, ldc,
                 bias ? bias + col : nullptr, accumulate);
  }
  for (; col < n; ++col)
    for (int r = 0; r < m; ++r) {
      float s = accumulate ? c[r * ldc + col] : bias ? bias[col] : 0.f;
      for (int j = 0; j < k; ++j) s += a[r * lda + j] * w[(size_t)j * ldw + col];
      c[r * ldc + col] = s;
    }
}

// A second core for the matrix products. One packet of one session is a chain of dependent
// products of ~0.1-1 M multiply-adds each, too short for a sleeping thread pool (a futex wake
// costs tens of microseconds): the helper spins for kSpin after each job and then sleeps. kSpin
// covers the gaps inside a step and between back-to-back steps, and is short enough not to rob
// a busy server's other threads. $EVSSM_NATIVE_SPIN_US sets it (microseconds) for measurements.
constexpr auto kSpin = std::chrono::microseconds(60);

std::chrono::microseconds spin_budget() {
  const char* env = std::getenv("EVSSM_NATIVE_SPIN_US");
  return env ? std::chrono::microseconds(std::max(0, std::atoi(env))) : kSpin;
}

class Helpers {
 public:
  explicit Helpers(int count)
      : parts_(count + 1), spin_(spin_budget()), tids_(new std::atomic<long>[count]) {
    for (int i = 0; i < count; ++i) {
      tids_[i].store(0);
      threads_.emplace_back([this, i] {
        // Named and numbered so that the server can read each helper's CPU clock (and top
        // or py-spy can show it) by its Linux thread id.
#if defined(__linux__)
        pthread_setname_np(pthread_self(), "evssm-helper");
        tids_[i].store(static_cast<long>(syscall(SYS_gettid)));
#endif
        loop();
      });
    }
  }
  // Never destroyed (see helpers()): the threads end with the process.
  ~Helpers() = delete;
  int parts() const { return parts_; }
  // Linux thread ids of the helpers that have started (0: not yet).
  std::vector<long> thread_ids() const {
    std::vector<long> ids;
    for (size_t i = 0; i < threads_.size(); ++i) ids.push_back(tids_[i].load());
    return ids;
  }

  // Runs fn(0 .. parts-1) and returns when all are done: the caller and the helpers claim parts
  // one at a time, so a part whose helper is asleep or preempted is run here rather than
  // waited for (on a busy machine a descheduled helper would hold the step for a scheduler
  // time slice, milliseconds). The helpers serve one caller at a time: a second thread
  // (another model's step, a classify) that finds them busy runs every part itself. The parts
  // are independent, so the result is the same however they are shared out.
  template <class F>
  void run(F& fn) {
    const int n = parts();
    std::unique_lock<std::mutex> owner(run_mutex_, std::try_to_lock);
    if (!owner.owns_lock() || n == 1) {
      for (int part = 0; part < n; ++part) fn(part);
      return;
    }
    job_ = [](void* f, int part) { (*static_cast<F*>(f))(part); };
    arg_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = posted_.load(std::memory_order_relaxed) + 1;
    next_.store(static_cast<uint64_t>(static_cast<uint32_t>(job)) << 32,
                std::memory_order_release);  // this job's parts, from part 0
    posted_.store(job, std::memory_order_release);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    for (int part; (part = claim(job, n)) >= 0;) {
      fn(part);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
    while (done_.load(std::memory_order_acquire) < n) __builtin_ia32_pause();
  }

  // Wakes sleeping helpers to spin for their budget: a caller about to run a step calls this a little
  // ahead (while its packet is being read), so that the wake-up, not the step, waits for the
  // scheduler. Costs an atomic load when the helpers are awake.
  void prime() {
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      primes_.fetch_add(1);
      wake_.notify_all();
    }
  }

  // No step follows at once: the helpers sleep as soon as they are idle instead of spinning out
  // their budget (the next prime() or job wakes them). The spin then covers the jobs of one
  // step and back-to-back steps only.
  void park() { parks_.fetch_add(1, std::memory_order_release); }

 private:
  void loop() {
    uint64_t seen = 0, seen_prime = 0, seen_park = parks_.load();
    using clock = std::chrono::steady_clock;
    for (;;) {
      auto idle_since = clock::now();
      int spins = 0;
      while (posted_.load(std::memory_order_acquire) == seen) {
        __builtin_ia32_pause();
        if (++spins % 256 == 0 && (parks_.load(std::memory_order_acquire) != seen_park ||
                                   clock::now() - idle_since > spin_)) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return posted_.load() != seen || primes_.load() != seen_prime; });
          sleeping_.fetch_sub(1);
          seen_prime = primes_.load();
          seen_park = parks_.load();  // parked before this wake-up: spent
          idle_since = clock::now();  // primed or posted: spin again
        }
      }
      seen = posted_.load(std::memory_order_acquire);
      for (int p; (p = claim(seen, parts_)) >= 0;) {
        job_(arg_, p);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  // The next unclaimed part of job ``job`` (of ``n``), or -1 when every part is taken or the
  // job is over. ``next_`` holds the job number's low 32 bits (high half) and the job's next
  // part (low half): a helper that wakes late claims nothing of a later job.
  int claim(uint64_t job, int n) {
    const uint64_t tag = static_cast<uint32_t>(job);
    uint64_t word = next_.load(std::memory_order_acquire);
    while ((word >> 32) == tag && static_cast<int>(word & 0xffffffffu) < n) {
      if (next_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel))
        return static_cast<int>(word & 0xffffffffu);
    }
    return -1;
  }

  const int parts_;  // the caller and the helpers
  const std::chrono::microseconds spin_;  // spinning after a job before sleeping
  std::unique_ptr<std::atomic<long>[]> tids_;  // each helper's Linux thread id
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> posted_{0};  // number of the last job posted
  std::atomic<uint64_t> next_{0};    // claims of the current job (see claim())
  std::atomic<int> done_{0};         // parts of the current job finished
  std::atomic<int> sleeping_{0};
  std::atomic<uint64_t> primes_{0};
  std::atomic<uint64_t> parks_{0};
  std::mutex mutex_;
  std::mutex run_mutex_;  // held by the one caller whose job the helpers run
  std::condition_variable wake_;
  void (*job_)(void*, int) = nullptr;
  void* arg_ = nullptr;
};

// $EVSSM_NATIVE_THREADS threads (default: up to 2 of the machine's cores) share the products.
// A forked child has none of its parent's threads: it starts its own.
std::atomic<Helpers*> the_helpers{nullptr};

Helpers& helpers() {
  Helpers* pool = the_helpers.load(std::memory_order_acquire);
  if (pool) return *pool;
  static std::mutex create;
  std::lock_guard<std::mutex> lock(create);
  if (!the_helpers.load()) {
    static const bool registered =
        pthread_atfork(nullptr, nullptr, [] { the_helpers.store(nullptr); }) == 0;
    (void)registered;
    const char* env = std::getenv("EVSSM_NATIVE_THREADS");
    const int threads =
        env ? std::atoi(env) : std::min(2, (int)std::thread::hardware_concurrency());
    the_helpers.store(new Helpers(std::max(1, threads) - 1));
  }
  return *the_helpers.load();
}

// matmul_serial with its columns shared among the threads when the product is large enough to
// repay the hand-off.
void matmul(const float* a, int lda, int m, int k, const float* w, int n, float* c, int ldc,
            const float* bias, bool accumulate) {
  Helpers& pool = helpers();
  const int parts = pool.parts();
  const int unit = m < 4 ? 64 : 16;
  if (parts == 1 || (size_t)m * k * n < 32768 || n < 2 * unit) {
    matmul_serial(a, lda, m, k, w, n, n, c, ldc, bias, accumulate);
    return;
  }
  const int units = (n + unit - 1) / unit;
  auto part = [&](int i) {
    const int begin = std::min(n, units * i / parts * unit);
    const int end = std::min(n, units * (i + 1) / parts * unit);
    if (end > begin)
      matmul_serial(a, lda, m, k, w + begin, n, end - begin, c + begin, ldc,
                    bias ? bias + begin : nullptr, accumulate);
  };
  pool.run(part);
}

// exp(step * t) for states [lo, hi) of P' complex values: step [2P'] = (re..., im...),
// out [2P']. Sine and cosine in separate loops: fused into sincos, GCC has no vector variant.
void cexp_row(const float* step, float t, int p, int lo, int hi, float* out) {
#pragma omp simd
  for (int j = lo; j < hi; ++j) out[p + j] = std::exp(step[j] * t) * std::sin(step[p + j] * t);
#pragma omp simd
  for (int j = lo; j < hi; ++j) out[j] = std::exp(step[j] * t) * std::cos(step[p + j] * t);
}

// s = d s + gain B~u over states [lo, hi): s, d, bu [2P'] split complex. inv_lambda non-null
// for zoh, where the gain is (d - 1) / Lambda per event (otherwise it is folded into bu).
inline void advance(float* s, const float* d, const float* bu, const float* inv_lambda, int p,
                    int lo, int hi) {
  if (inv_lambda) {
#pragma omp simd
    for (int j = lo; j < hi; ++j) {
      const float gr0 = d[j] - 1.f, gi0 = d[p + j];
      const float gr = gr0 * inv_lambda[j] - gi0 * inv_lambda[p + j];
      const float gi = gr0 * inv_lambda[p + j] + gi0 * inv_lambda[j];
      const float br = gr * bu[j] - gi * bu[p + j];
      const float bi = gr * bu[p + j] + gi * bu[j];
      const float sr = s[j], si = s[p + j];
      s[j] = d[j] * sr - d[p + j] * si + br;
      s[p + j] = d[j] * si + d[p + j] * sr + bi;
    }
    return;
  }
#pragma omp simd
  for (int j = lo; j < hi; ++j) {
    const float sr = s[j], si = s[p + j];
    s[j] = d[j] * sr - d[p + j] * si + bu[j];
    s[p + j] = d[j] * si + d[p + j] * sr + bu[p + j];
  }
}

// LayerNorm (a = scale, b = bias) or inference BatchNorm folded to x a + b, row by row.
void normalize(const float* x, int ldx, int rows, int d, int kind, const float* a, const float* b,
               float eps, float* out, int ldo) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (size_t)r * ldx;
    float* o = out + (size_t)r * ldo;
    if (kind == NORM_LAYER) {
      float mean = 0.f;
      for (int j = 0; j < d; ++j) mean += xr[j];
      mean /= d;
      float var = 0.f;
      for (int j = 0; j < d; ++j) var += (xr[j] - mean) * (xr[j] - mean);
      const float inv = 1.f / std::sqrt(var / d + eps);
#pragma omp simd
      for (int j = 0; j < d; ++j) o[j] = (xr[j] - mean) * inv * a[j] + b[j];
    } else {
#pragma omp simd
      for (int j = 0; j < d; ++j) o[j] = xr[j] * a[j] + b[j];
    }
  }
}

// --- the step ------------------------------------------------------------------------------
// One session's inputs to one layer's recurrence, event by event (or row by row).
struct Events {
  std::vector<const float*> bu;     // [2P'] gained B~u (B~u for zoh)
  std::vector<const float*> pool;   // [d_pool] pooling input, or null
  std::vector<const float*> decay;  // [2P'] tabulated decay, or null: computed from dt
  std::vector<float> dt;            // time step (ms)
  std::vector<float> weight;        // pooling weight
  std::vector<float> divisor;       // sum of the window's weights, where a window completes
  std::vector<int> src;             // the session's input event it stems from (see Scratch)
  std::vector<int> emit;            // output row written after this event, or -1
  std::vector<uint8_t> first;       // the event opens a window
  void clear() {
    bu.clear(); pool.clear(); decay.clear(); dt.clear(); src.clear(); weight.clear();
    divisor.clear(); emit.clear(); first.clear();
  }
  void add(const float* b, const float* p, const float* d, float t, int from) {
    bu.push_back(b); pool.push_back(p); decay.push_back(d); dt.push_back(t); src.push_back(from);
  }
};

// A session's packets in one call (entries with the same slot) are one row of events, numbered
// 0.. in order; every row of every layer carries `src`, the number of the event that completed
// it, so the head can tell which packet's readout each final-rate row belongs to.
struct Scratch {
  std::vector<float> ws, pooled, dt, x, x_next, dt_in, dt_next, y, g, u, bu, pool_in, tmp;
  std::vector<float> head_in;  // the head's pooled rows
  std::vector<int> src, src_in, src_next;  // per row, as dt / dt_in / dt_next
  std::vector<int> rows, next_rows;
  std::vector<int> order;  // entries grouped by session, in entry order within one
  std::vector<int> begin;  // session s's entries are order[begin[s] .. begin[s + 1])
  std::vector<int> ends;   // per entry: events of its session up to its packet's end
  std::vector<float*> row_ptrs;  // per session: its state row
  std::vector<Events> events;  // per session
  std::vector<float*> outputs;  // per session: where its stride-1 states go, or null
};

struct Net {
  const float* w;
  const int32_t* plan;
  const int32_t* layer(int i) const { return plan + H_FIELDS + i * L_FIELDS; }
  const float* at(int32_t offset) const { return offset >= 0 ? w + offset : nullptr; }
};

// Pass 1 of a session's recurrence: the scalar bookkeeping of the pooling windows (weights,
// completed windows, their divisors and time steps; the carried count, sum_w and sum_dt).
// Output rows are numbered from `row`; returns the number of rows.
int plan_windows(const int32_t* lay, int mode, float eps, float* row_f, int32_t* row_i, int row,
                 Events& ev, std::vector<float>& out_dt, std::vector<int>& out_src) {
  const int n = static_cast<int>(ev.dt.size()), stride = lay[L_STRIDE];
  ev.weight.resize(n);
  ev.divisor.resize(n);
  ev.emit.resize(n);
  ev.first.resize(n);
  if (stride == 1) {
    for (int i = 0; i < n; ++i) {
      ev.emit[i] = row + i;
      out_dt.push_back(ev.dt[i]);
      out_src.push_back(ev.src[i]);
    }
    return n;
  }
  int32_t& count = row_i[lay[L_COUNT]];
  float& sum_w = row_f[lay[L_SUM_W]];
  float& sum_dt = row_f[lay[L_SUM_DT]];
  int rows = 0;
  for (int i = 0; i < n; ++i) {
    const float w = mode == POOL_AVG ? 1.f : mode == POOL_TIME ? ev.dt[i] + eps
                                                               : (count == 0 ? 1.f : 0.f);
    ev.weight[i] = w;
    ev.first[i] = count == 0;
    sum_w += w;
    sum_dt += ev.dt[i];
    if (++count == stride) {
      ev.emit[i] = row + rows++;
      ev.divisor[i] = sum_w > 0.f ? sum_w : 1.f;
      out_dt.push_back(sum_dt);
      out_src.push_back(ev.src[i]);
      sum_w = sum_dt = 0.f;
      count = 0;
    } else {
      ev.emit[i] = -1;
    }
  }
  return rows;
}

// dst = src over states [lo, hi) of P' complex values (real parts, then imaginary parts).
inline void copy_states(float* dst, const float* src, int p, int lo, int hi) {
  std::memcpy(dst + lo, src + lo, sizeof(float) * (hi - lo));
  std::memcpy(dst + p + lo, src + p + lo, sizeof(float) * (hi - lo));
}

// Events ahead whose table rows are prefetched while one computes.
constexpr int kPrefetchAhead = 12;

// Pass 2, over states [lo, hi) and pooling columns [qlo, qhi) only: the recurrence, the
// window-start states and the pooled inputs. Threads share a session by splitting columns.
void run_columns(const int32_t* lay, const float* step, const float* inv_lambda, float* row_f,
                 const Events& ev, float* ws, float* pooled, float* tmp, int lo, int hi, int qlo,
                 int qhi) {
  const int p = lay[L_P], stride = lay[L_STRIDE], d_pool = lay[L_DPOOL];
  const int n = static_cast<int>(ev.dt.size());
  float* s = row_f + lay[L_S_LAST];
  float* s_first = stride > 1 ? row_f + lay[L_S_FIRST] : nullptr;
  float* sum_wx = stride > 1 ? row_f + lay[L_SUM_WX] : nullptr;
  for (int i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) {
      const float* bu = ev.bu[i + kPrefetchAhead];
      const float* in = ev.pool[i + kPrefetchAhead];
      for (int j = lo; j < hi; j += 16) {
        __builtin_prefetch(bu + j);
        __builtin_prefetch(bu + p + j);
      }
      if (in)
        for (int j = qlo; j < qhi; j += 16) __builtin_prefetch(in + j);
    }
    const float* d = ev.decay[i];
    if (!d) {
      cexp_row(step, ev.dt[i], p, lo, hi, tmp);
      d = tmp;
    }
    advance(s, d, ev.bu[i], inv_lambda, p, lo, hi);
    const int r = ev.emit[i];
    if (stride == 1) {
      copy_states(ws + (size_t)r * 2 * p, s, p, lo, hi);
      if (pooled && ev.pool[i])
        std::memcpy(pooled + (size_t)r * d_pool + qlo, ev.pool[i] + qlo,
                    sizeof(float) * (qhi - qlo));
      continue;
    }
    if (ev.first[i]) copy_states(s_first, s, p, lo, hi);
    const float w = ev.weight[i];
    const float* in = ev.pool[i];
#pragma omp simd
    for (int j = qlo; j < qhi; ++j) sum_wx[j] += w * in[j];
    if (r < 0) continue;
    copy_states(ws + (size_t)r * 2 * p, s_first, p, lo, hi);
    const float div = ev.divisor[i];
    float* pout = pooled + (size_t)r * d_pool;
#pragma omp simd
    for (int j = qlo; j < qhi; ++j) pout[j] = sum_wx[j] / div;
    std::fill(sum_wx + qlo, sum_wx + qhi, 0.f);
    // Between windows the carried window-start state is the latest state (as the XLA step
    // leaves it), so the two backends' states stay interchangeable.
    copy_states(s_first, s, p, lo, hi);
  }
}

// Every session through one layer's recurrence (sc.events[b] holds session b's inputs).
// Pass 1 for all sessions, then pass 2 shared among the threads: by sessions when there are
// several; for one session, by columns in the deeper layers (their exponentials) and by role
// in the first. Output rows of strided layers are stacked in session order in sc.ws /
// sc.pooled; stride-1 states go to sc.outputs[b]. Time steps of the output rows go to sc.dt,
// row counts to sc.next_rows.
void recur(const Net& net, const int32_t* lay, int batch, float* const* state, Scratch& sc,
           bool first) {
  const int32_t* plan = net.plan;
  const int p = lay[L_P], d_pool = lay[L_DPOOL], stride = lay[L_STRIDE];
  const float eps = net.at(plan[H_CONSTS])[1];
  sc.dt.clear();
  sc.src.clear();
  sc.next_rows.assign(batch, 0);
  size_t events = 0;
  for (int b = 0; b < batch; ++b) {
    float* row_f = state[b];
    // Strided and first-layer rows are stacked; a deeper stride-1 layer's go to sc.outputs[b].
    const int row0 = stride == 1 && !first ? 0 : static_cast<int>(sc.dt.size());
    sc.next_rows[b] = plan_windows(lay, plan[H_POOL], eps, row_f,
                                   reinterpret_cast<int32_t*>(row_f), row0, sc.events[b], sc.dt,
                                   sc.src);
    events += sc.events[b].dt.size();
  }
  const size_t rows = sc.dt.size();
  float* ws = nullptr;
  float* pooled = nullptr;
  if (stride > 1 || first) {
    sc.ws.resize(rows * 2 * p);
    sc.pooled.resize(rows * d_pool);
    ws = sc.ws.data();
    pooled = sc.pooled.data();
  }
  const float* step = net.at(lay[L_STEP]);
  const float* inv_lambda = plan[H_ZOH] ? net.at(lay[L_INV_LAMBDA]) : nullptr;
  Helpers& pool = helpers();
  const int threads = pool.parts();
  const bool by_sessions = threads > 1 && batch > 1 && events * (2 * p + d_pool) >= 16384;
  const bool by_columns = threads > 1 && batch == 1 && !first && p >= 16 &&
                          events * (2 * p + d_pool) >= 4096;
  // One session's first layer: one thread runs the recurrence (the B~u rows), the other the
  // pooling sums (the pooling rows); splitting both by columns measured slower.
  const bool by_roles = threads == 2 && batch == 1 && first && stride > 1 && events >= 32;
  const int parts = by_sessions || by_columns || by_roles ? threads : 1;
  sc.tmp.resize((size_t)parts * 2 * p);
  auto part = [&](int i) {
    float* tmp = sc.tmp.data() + (size_t)i * 2 * p;
    for (int b = by_sessions ? i : 0; b < batch; b += by_sessions ? parts : 1) {
      if (sc.events[b].dt.empty()) continue;
      float* out = stride == 1 && !first ? sc.outputs[b] : ws;
      int lo = 0, hi = p, qlo = 0, qhi = d_pool;
      if (by_columns) {
        lo = p / 8 * i / parts * 8;
        hi = i + 1 == parts ? p : p / 8 * (i + 1) / parts * 8;
        qlo = d_pool / 8 * i / parts * 8;
        qhi = i + 1 == parts ? d_pool : d_pool / 8 * (i + 1) / parts * 8;
      }
      if (by_roles) {
        if (i == 0) {
          qlo = qhi = 0;
        } else {
          lo = hi = 0;
        }
      }
      run_columns(lay, step, inv_lambda, state[b], sc.events[b], out, pooled,
                  tmp, lo, hi, qlo, qhi);
    }
  };
  if (parts > 1) {
    pool.run(part);
  } else {
    part(0);
  }
}

// Readout, gate and residual of layer `lay` on `rows` stacked rows -> sc.x_next [rows, d_out].
// ws [rows, 2P'] states; u [rows, d_in] (ldu) the SSM input; skip [rows, d_in] (lds).
void layer_output(const Net& net, const int32_t* lay, int rows, const float* ws, const float* u,
                  int ldu, const float* skip, int lds, Scratch& sc) {
  const int d_in = lay[L_DIN], d_out = lay[L_DOUT], p = lay[L_P];
  const float* consts = net.at(net.plan[H_CONSTS]);
  sc.y.resize((size_t)rows * d_out);
  sc.g.resize((size_t)rows * d_out);
  sc.x_next.resize((size_t)rows * d_out);
  float* y = sc.y.data();
  // y = c Re(C~ s) + D u
  matmul(ws, 2 * p, rows, 2 * p, net.at(lay[L_C]), d_out, y, d_out, nullptr, false);
  if (lay[L_D_MATRIX]) {
    matmul(u, ldu, rows, d_in, net.at(lay[L_D]), d_out, y, d_out, nullptr, true);
  } else {
    const float* dv = net.at(lay[L_D]);
    for (int r = 0; r < rows; ++r)
#pragma omp simd
      for (int j = 0; j < d_out; ++j) y[(size_t)r * d_out + j] += u[(size_t)r * ldu + j] * dv[j];
  }
  // g = Dense(GELU(y)): exact (erf) GELU, or its tanh approximation
  float* t = sc.x_next.data();
  const size_t n = (size_t)rows * d_out;
  if (net.plan[H_GELU] == GELU_TANH) {
    // 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))
#pragma omp simd
    for (size_t i = 0; i < n; ++i)
      t[i] = 0.5f * y[i] *
             (1.f + std::tanh(0.79788456080286536f * (y[i] + 0.044715f * y[i] * y[i] * y[i])));
  } else {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) t[i] = 0.5f * y[i] * (1.f + std::erf(y[i] * 0.70710678118654752f));
  }
  matmul(t, d_out, rows, d_out, net.at(lay[L_GATE_W]), d_out, sc.g.data(), d_out,
         net.at(lay[L_GATE_B]), false);
  float* x = sc.x_next.data();
  const float* g = sc.g.data();
  // sigmoid(g) = 1 / (1 + e^-g) for g >= 0, e^g / (1 + e^g) below, with e = exp(-|g|) in
  // (0, 1]: no infinity at any g. (1 + exp(-g) overflows for g < -88, and -ffast-math turns
  // y / inf into y * rcp(inf) refined by Newton's step, 0 * inf = NaN.)
#pragma omp simd
  for (size_t i = 0; i < n; ++i) {
    const float e = std::exp(-std::fabs(g[i]));
    x[i] = y[i] * ((g[i] >= 0.f ? 1.f : e) / (1.f + e));
  }
  // residual
  if (lay[L_SKIP_W] >= 0) {
    matmul(skip, lds, rows, d_in, net.at(lay[L_SKIP_W]), d_out, x, d_out, nullptr, true);
    const float* sb = net.at(lay[L_SKIP_B]);
    for (int r = 0; r < rows; ++r)
#pragma omp simd
      for (int j = 0; j < d_out; ++j) x[(size_t)r * d_out + j] += sb[j];
  } else {
    for (int r = 0; r < rows; ++r)
#pragma omp simd
      for (int j = 0; j < d_out; ++j) x[(size_t)r * d_out + j] += skip[(size_t)r * lds + j];
  }
  if (!net.plan[H_PRENORM]) {
    normalize(x, d_out, rows, d_out, net.plan[H_NORM], net.at(lay[L_NORM_A]),
              net.at(lay[L_NORM_B]), consts[0], x, d_out);
  }
}

// The first layer: events of every session -> stacked output rows in sc.x / sc.dt_next, rows
// per session in sc.rows. Session b's events are those of its entries e = sc.order[sc.begin[b]
// ..], each tokens/gaps[starts[e] .. + lengths[e]), in that order; sc.ends[e] is set.
void first_layer(const Net& net, int batch, const int32_t* tokens, const int32_t* gaps,
                 const int64_t* starts, const int32_t* lengths, float* const* state,
                 Scratch& sc) {
  const int32_t* plan = net.plan;
  const int32_t* lay = net.layer(0);
  const int p = lay[L_P], d_in = lay[L_DIN], d_pool = lay[L_DPOOL];
  const float* table_bu = net.at(plan[H_TABLE_BU]);
  const float* table_pool = net.at(plan[H_TABLE_POOL]);
  const float* table_decay = net.at(plan[H_TABLE_DECAY]);
  const int decay_size = plan[H_DECAY_SIZE], vocab = plan[H_VOCAB];
  if ((int)sc.events.size() < batch) sc.events.resize(batch);
  for (int b = 0; b < batch; ++b) {
    Events& ev = sc.events[b];
    ev.clear();
    // Time look-ahead (model.py::hold_last_token): event i is the token before it (the held
    // one, token + 1 in the state row, for a packet's first event) with event i's gap; with
    // none held, the first event only becomes the held token.
    int32_t* held = plan[H_HELD] >= 0
                        ? reinterpret_cast<int32_t*>(state[b]) + plan[H_HELD] : nullptr;
    int number = 0;  // the session's events so far in this call
    for (int k = sc.begin[b]; k < sc.begin[b + 1]; ++k) {
      const int e = sc.order[k];
      const int n = std::max(lengths[e], 0);
      const int32_t* row_tokens = tokens + starts[e];
      const int32_t* row_gaps = gaps + starts[e];
      for (int i = held && *held == 0 ? 1 : 0; i < n; ++i) {
        // Out-of-range tokens index as in JAX: negative ones count from the end, then clamp.
        int token = !held ? row_tokens[i] : i == 0 ? *held - 1 : row_tokens[i - 1];
        token = std::min(std::max(token < 0 ? token + vocab : token, 0), vocab - 1);
        const int gap = row_gaps[i];
        ev.add(table_bu + (size_t)token * 2 * p, table_pool + (size_t)token * d_pool,
               gap >= 0 && gap < decay_size ? table_decay + (size_t)gap * 2 * p : nullptr,
               static_cast<float>(gap) * 1e-3f, number + i);
      }
      // Held across the session's packets exactly as between calls.
      if (held && n > 0) *held = row_tokens[n - 1] + 1;
      number += n;
      sc.ends[e] = number;
    }
  }
  recur(net, lay, batch, state, sc, true);
  sc.rows.swap(sc.next_rows);
  sc.dt_next.swap(sc.dt);
  sc.src_next.swap(sc.src);
  const int rows = static_cast<int>(sc.dt_next.size());
  if (rows == 0) return;
  const float* skip = plan[H_PRENORM] ? sc.pooled.data() + d_in : sc.pooled.data();
  layer_output(net, lay, rows, sc.ws.data(), sc.pooled.data(), d_pool, skip, d_pool, sc);
  sc.x.swap(sc.x_next);
}

// Layer `index` > 0 on the stacked rows of the layer below (sc.x [rows, d_in], sc.dt_next).
void deeper_layer(const Net& net, int index, int batch, float* const* state, Scratch& sc) {
  const int32_t* plan = net.plan;
  const int32_t* lay = net.layer(index);
  const int p = lay[L_P], stride = lay[L_STRIDE], d_in = lay[L_DIN], d_pool = lay[L_DPOOL];
  const float* consts = net.at(plan[H_CONSTS]);
  const int rows_in = static_cast<int>(sc.dt_next.size());
  const bool prenorm = plan[H_PRENORM];
  // Features: u = Norm(x) (prenorm), B~u for every row; the pooling input is [u, x] or x.
  const float* x = sc.x.data();
  const float* u = x;
  if (prenorm) {
    sc.u.resize((size_t)rows_in * d_in);
    normalize(x, d_in, rows_in, d_in, plan[H_NORM], net.at(lay[L_NORM_A]), net.at(lay[L_NORM_B]),
              consts[0], sc.u.data(), d_in);
    u = sc.u.data();
  }
  sc.bu.resize((size_t)rows_in * 2 * p);
  matmul(u, d_in, rows_in, d_in, net.at(lay[L_B]), 2 * p, sc.bu.data(), 2 * p, nullptr, false);
  const float* pin = x;
  if (stride > 1 && prenorm) {
    sc.pool_in.resize((size_t)rows_in * d_pool);
    for (int r = 0; r < rows_in; ++r) {
      std::memcpy(sc.pool_in.data() + (size_t)r * d_pool, u + (size_t)r * d_in,
                  sizeof(float) * d_in);
      std::memcpy(sc.pool_in.data() + (size_t)r * d_pool + d_in, x + (size_t)r * d_in,
                  sizeof(float) * d_in);
    }
    pin = sc.pool_in.data();
  }
  std::vector<float>& in_dt = sc.dt_in;
  in_dt.swap(sc.dt_next);
  sc.src_in.swap(sc.src_next);
  sc.outputs.assign(batch, nullptr);
  int at = 0;
  for (int b = 0; b < batch; ++b) {
    Events& ev = sc.events[b];
    ev.clear();
    for (int r = at; r < at + sc.rows[b]; ++r)
      ev.add(sc.bu.data() + (size_t)r * 2 * p, stride > 1 ? pin + (size_t)r * d_pool : nullptr,
             nullptr, in_dt[r], sc.src_in[r]);
    // Stride 1: every row is an output; its state replaces its B~u in place.
    sc.outputs[b] = sc.bu.data() + (size_t)at * 2 * p;
    at += sc.rows[b];
  }
  recur(net, lay, batch, state, sc, false);
  sc.rows.swap(sc.next_rows);
  sc.dt_next.swap(sc.dt);
  sc.src_next.swap(sc.src);
  const int rows = static_cast<int>(sc.dt_next.size());
  if (rows == 0) {
    sc.x.clear();
    return;
  }
  if (stride == 1) {
    layer_output(net, lay, rows, sc.bu.data(), u, d_in, x, d_in, sc);
  } else {
    const float* skip = prenorm ? sc.pooled.data() + d_in : sc.pooled.data();
    layer_output(net, lay, rows, sc.ws.data(), sc.pooled.data(), d_pool, skip, d_pool, sc);
  }
  sc.x.swap(sc.x_next);
}

// total += inc with Kahan's compensation comp (model.py::kahan_add, the same arithmetic):
// y = inc - comp; t = total + y; comp = (t - total) - y; total = t. The barriers keep
// -ffast-math from reassociating (t - total) - y into 0.
inline void kahan_add(float& total, float& comp, float inc) {
  const float y = inc - comp;
  const float t = __builtin_assoc_barrier(total + y);
  comp = __builtin_assoc_barrier(t - total) - y;
  total = t;
}

// The head's running pool over the final-rate rows, then the logits after every entry: entry e
// of session b reads out after its packet, from the rows of events before sc.ends[e]. As in
// XLA's step, a packet's rows are summed first and added to the running sums once, compensated.
void head(const Net& net, int batch, float* const* state, float* logits, int32_t* ready,
          Scratch& sc, bool have_rows, int entries) {
  const int32_t* plan = net.plan;
  const int width = plan[H_WIDTH], classes = plan[H_CLASSES], mode = plan[H_HEAD];
  const float eps = net.at(plan[H_CONSTS])[1];
  int at = 0;
  std::vector<float>& pooled = sc.head_in;
  pooled.resize((size_t)entries * width);
  for (int b = 0; b < batch; ++b) {
    float* row_f = state[b];
    int32_t* row_i = reinterpret_cast<int32_t*>(row_f);
    float* sum_z = row_f + plan[H_SUM_Z];
    float* sum_z_c = row_f + plan[H_SUM_Z_C];
    float* sum_w = row_f + plan[H_SUM_W];
    float* last_z = row_f + plan[H_LAST_Z];
    int32_t* count = row_i + plan[H_COUNT];
    // With the total-time divisor: the completed final-rate windows' pooled time.
    float* sum_dt = plan[H_HEAD_SUM_DT] >= 0 ? row_f + plan[H_HEAD_SUM_DT] : nullptr;
    const int end = at + (have_rows ? sc.rows[b] : 0);
    for (int k = sc.begin[b]; k < sc.begin[b + 1]; ++k) {
      const int e = sc.order[k];
      int stop = at;  // this packet's rows: at .. stop
      while (stop < end && sc.src_next[stop] < sc.ends[e]) ++stop;
      const int rows = stop - at;
      if (rows > 0) {
        float* inc_z = pooled.data() + (size_t)e * width;  // this packet's sums (out comes later)
        std::fill(inc_z, inc_z + width, 0.f);
        float inc_w = 0.f, inc_dt = 0.f;
        for (int r = at; r < stop; ++r) {
          const float* z = sc.x.data() + (size_t)r * width;
          const float wgt = mode == HEAD_TIME ? sc.dt_next[r] + eps : 1.f;
          for (int j = 0; j < width; ++j) inc_z[j] += wgt * z[j];
          inc_w += wgt;
          inc_dt += sc.dt_next[r];
        }
        for (int j = 0; j < width; ++j) kahan_add(sum_z[j], sum_z_c[j], inc_z[j]);
        kahan_add(*sum_w, row_f[plan[H_SUM_W_C]], inc_w);
        if (sum_dt) kahan_add(*sum_dt, row_f[plan[H_HEAD_SUM_DT_C]], inc_dt);
        std::memcpy(last_z, sc.x.data() + (size_t)(stop - 1) * width, sizeof(float) * width);
      }
      *count += rows;
      at = stop;
      ready[e] = *count > 0;
      float* out = pooled.data() + (size_t)e * width;
      if (mode == HEAD_LAST) {
        std::memcpy(out, last_z, sizeof(float) * width);
      } else {
        float total = *sum_w;
        if (sum_dt) {
          // T = sum of every event's dt: the completed windows' plus every strided layer's
          // partial window (model.py::EventSSM._total_time, in the same order). The partial
          // windows are those after the session's last entry: the step refuses a session with
          // several entries under this divisor.
          total = *sum_dt;
          for (int i = 0; i < plan[H_LAYERS]; ++i)
            if (net.layer(i)[L_STRIDE] > 1) total += row_f[net.layer(i)[L_SUM_DT]];
        }
        const float div = total > 0.f ? total : 1.f;
        for (int j = 0; j < width; ++j) out[j] = sum_z[j] / div;
      }
    }
  }
  matmul(pooled.data(), width, entries, width, net.at(plan[H_HEAD_W]), classes, logits, classes,
         net.at(plan[H_HEAD_B]), false);
}

}  // namespace

// Advances sessions in place on their packed state rows by `batch` entries, one packet each:
// entry b steps row pool[slots[b]] (pool[b] when slots is null); a slot outside the pool marks a
// padding entry, stepped from a zero state and not written. Entries with the same slot are one
// session's consecutive packets in entry order, stepped as one row of events with a readout
// after each (the same arithmetic as one call per packet). The packets are ragged rows of one
// flat buffer: entry b's events are tokens/gaps[starts[b] .. starts[b] + lengths[b]) (the
// caller has checked that every row lies inside the buffer); logits [batch, classes] and ready
// [batch] are written per entry. Returns 0, or -1 with a message in error (the pool untouched).
// The extension function step() below calls it without the GIL.
extern "C" int evssm_streaming_step(const float* weights, const int32_t* plan, int plan_len,
                                    int32_t* pool, int pool_rows, const int32_t* slots,
                                    int batch, const int32_t* tokens, const int32_t* gaps,
                                    const int64_t* starts, const int32_t* lengths, float* logits,
                                    int32_t* ready, char* error, int error_len) {
  auto fail = [&](const char* message) {
    std::snprintf(error, error_len, "%s", message);
    return -1;
  };
  if (plan_len < H_FIELDS || plan[H_VERSION] != kVersion ||
      plan_len < H_FIELDS + L_FIELDS * plan[H_LAYERS])
    return fail("plan version or size mismatch (rebuild the native step)");
  auto coded = [&](int field, int choices) { return plan[field] >= 0 && plan[field] < choices; };
  if (!coded(H_POOL, POOL_MODES) || !coded(H_HEAD, HEAD_MODES) || !coded(H_NORM, NORMS) ||
      !coded(H_GELU, GELUS))
    return fail("plan codes a mode the native step does not know (rebuild the native step)");
  if (batch < 0 || pool_rows < 0) return fail("negative dimension");
  if (!slots && pool_rows < batch) return fail("pool has fewer rows than sessions");
  const int words = plan[H_WORDS];
  thread_local Scratch sc;
  thread_local std::vector<int32_t> padding;
  // Sessions: entries grouped by slot (a padding entry alone), stably, so each session's
  // entries keep their order.
  auto key = [&](int b) -> int64_t {
    const int row = slots ? slots[b] : b;
    return row >= 0 && row < pool_rows ? row : (int64_t)pool_rows + b;
  };
  sc.order.resize(batch);
  for (int b = 0; b < batch; ++b) sc.order[b] = b;
  bool sorted = true;
  for (int b = 1; b < batch && sorted; ++b) sorted = key(b - 1) < key(b);
  if (!sorted)
    std::stable_sort(sc.order.begin(), sc.order.end(),
                     [&](int a, int b) { return key(a) < key(b); });
  sc.begin.clear();
  for (int k = 0; k < batch; ++k)
    if (k == 0 || key(sc.order[k]) != key(sc.order[k - 1])) sc.begin.push_back(k);
  const int sessions = static_cast<int>(sc.begin.size());
  sc.begin.push_back(batch);
  if (sessions < batch && plan[H_HEAD_SUM_DT] >= 0)
    return fail("several packets of one session in one step need a head without the total-time "
                "divisor");
  sc.ends.assign(batch, 0);
  sc.row_ptrs.resize(sessions);
  int padding_rows = 0;
  for (int s = 0; s < sessions; ++s) padding_rows += key(sc.order[sc.begin[s]]) >= pool_rows;
  padding.assign((size_t)padding_rows * words, 0);
  int next_padding = 0;
  for (int s = 0; s < sessions; ++s) {
    const int64_t row = key(sc.order[sc.begin[s]]);
    sc.row_ptrs[s] = reinterpret_cast<float*>(
        row < pool_rows ? pool + (size_t)row * words : padding.data() + (size_t)next_padding++ * words);
  }
  Net net{weights, plan};
  float* const* state = sc.row_ptrs.data();
  first_layer(net, sessions, tokens, gaps, starts, lengths, state, sc);
  bool have_rows = !sc.dt_next.empty();
  for (int i = 1; i < plan[H_LAYERS] && have_rows; ++i) {
    deeper_layer(net, i, sessions, state, sc);
    have_rows = !sc.dt_next.empty();
  }
  head(net, sessions, state, logits, ready, sc, have_rows, batch);
  return 0;
}

// --- Python binding ----------------------------------------------------------------------
// step(weights, plan, pool, slots, tokens, gaps, starts, lengths, logits, ready): buffers of
// C-contiguous NumPy arrays (int64 starts, the rest of 4-byte items); slots may be None. The
// kernel runs without the GIL. A plain extension function, not ctypes: ctypes spends ~2 us
// converting each array argument.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

struct View {
  Py_buffer buf{};
  bool held = false;
  ~View() {
    if (held) PyBuffer_Release(&buf);
  }
  // A C-contiguous buffer of `kind` items ('i' int32, 'q' int64, 'f' float32), `ndim` dims.
  bool get(PyObject* obj, const char* name, char kind, int ndim, bool writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf, flags) != 0) {
      PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s array", name,
                   writable ? " writable" : "");
      return false;
    }
    held = true;
    const char* fmt = buf.format ? buf.format : "B";
    const char last = fmt[std::strlen(fmt) - 1];
    const Py_ssize_t size = kind == 'q' ? 8 : 4;
    const bool ok_kind = kind == 'f' ? last == 'f' : (last == 'i' || last == 'l' || last == 'q');
    if (buf.itemsize != size || !ok_kind || buf.ndim != ndim) {
      PyErr_Format(PyExc_ValueError, "%s: expected a %d-d %s array", name, ndim,
                   kind == 'f' ? "float32" : kind == 'q' ? "int64" : "int32");
      return false;
    }
    return true;
  }
  Py_ssize_t dim(int i) const { return buf.shape[i]; }
  template <class T>
  T* data() const { return static_cast<T*>(buf.buf); }
};

PyObject* py_step(PyObject*, PyObject* args) {
  PyObject *weights_o, *plan_o, *pool_o, *slots_o, *tokens_o, *gaps_o, *starts_o, *lengths_o,
      *logits_o, *ready_o;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &weights_o, &plan_o, &pool_o, &slots_o, &tokens_o,
                        &gaps_o, &starts_o, &lengths_o, &logits_o, &ready_o))
    return nullptr;
  View weights, plan, pool, slots, tokens, gaps, starts, lengths, logits, ready;
  if (!weights.get(weights_o, "weights", 'f', 1, false) ||
      !plan.get(plan_o, "plan", 'i', 1, false) || !pool.get(pool_o, "pool", 'i', 2, true) ||
      !tokens.get(tokens_o, "tokens", 'i', 1, false) ||
      !gaps.get(gaps_o, "gaps", 'i', 1, false) ||
      !starts.get(starts_o, "starts", 'q', 1, false) ||
      !lengths.get(lengths_o, "lengths", 'i', 1, false) ||
      !logits.get(logits_o, "logits", 'f', 2, true) || !ready.get(ready_o, "ready", 'i', 1, true))
    return nullptr;
  const bool have_slots = slots_o != Py_None;
  if (have_slots && !slots.get(slots_o, "slots", 'i', 1, false)) return nullptr;
  const Py_ssize_t batch = lengths.dim(0), events = tokens.dim(0);
  const int32_t* p = plan.data<int32_t>();
  if (plan.dim(0) < H_FIELDS || pool.dim(1) != p[H_WORDS] || gaps.dim(0) != events ||
      starts.dim(0) != batch || logits.dim(0) != batch || logits.dim(1) != p[H_CLASSES] ||
      ready.dim(0) != batch || (have_slots && slots.dim(0) != batch) || batch > INT32_MAX) {
    PyErr_SetString(PyExc_ValueError, "inconsistent shapes for the native streaming step");
    return nullptr;
  }
  const int64_t* row_starts = starts.data<int64_t>();
  const int32_t* row_lengths = lengths.data<int32_t>();
  for (Py_ssize_t b = 0; b < batch; ++b) {
    if (row_starts[b] < 0 || row_lengths[b] < 0 || row_starts[b] + row_lengths[b] > events) {
      PyErr_Format(PyExc_ValueError, "row %zd (start %lld, length %d) is outside the %zd events",
                   b, (long long)row_starts[b], row_lengths[b], events);
      return nullptr;
    }
  }
  char error[256] = "";
  int status;
  Py_BEGIN_ALLOW_THREADS
  status = evssm_streaming_step(weights.data<float>(), p, static_cast<int>(plan.dim(0)),
                                pool.data<int32_t>(), static_cast<int>(pool.dim(0)),
                                have_slots ? slots.data<int32_t>() : nullptr,
                                static_cast<int>(batch), tokens.data<int32_t>(),
                                gaps.data<int32_t>(), row_starts, row_lengths,
                                logits.data<float>(), ready.data<int32_t>(), error, sizeof error);
  Py_END_ALLOW_THREADS
  if (status != 0) {
    PyErr_SetString(PyExc_RuntimeError, error);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// --- packet ingest ------------------------------------------------------------------------------
// ingest(t, x, y, p, width, height, last_t, tokens, gaps) -> bool: one pass over an events
// packet's columns (NumPy arrays of any stride: t int64 or uint64, x and y uint16 or int64, p
// uint8 or int64; y and p None for a 1-D sensor of `width` channels). Checks every address
// against the sensor and that no timestamp goes back (from last_t, None at a stream's start),
// and writes tokens (x + W y + W H p) and gaps (microseconds, clamped to int32) into the int32
// arrays `tokens`, `gaps`. False when the packet is invalid or a column's type is not one of
// these: the caller then runs the reference (server/protocol.py), which names the fault; what
// was written is not used.

enum ColumnKind { COL_I64, COL_U64, COL_U16, COL_U8, COL_BAD };

struct Column {
  Py_buffer buf{};
  bool held = false;
  ColumnKind kind = COL_BAD;
  ~Column() {
    if (held) PyBuffer_Release(&buf);
  }
  bool get(PyObject* obj) {
    if (PyObject_GetBuffer(obj, &buf, PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      return false;
    }
    held = true;
    const char* fmt = buf.format ? buf.format : "B";
    if (buf.ndim != 1 || fmt[0] == '>' || fmt[0] == '!') return false;
    const char c = fmt[std::strlen(fmt) - 1];
    if (buf.itemsize == 8 && (c == 'q' || c == 'l')) kind = COL_I64;
    else if (buf.itemsize == 8 && (c == 'Q' || c == 'L')) kind = COL_U64;
    else if (buf.itemsize == 2 && c == 'H') kind = COL_U16;
    else if (buf.itemsize == 1 && c == 'B') kind = COL_U8;
    return kind != COL_BAD;
  }
  Py_ssize_t size() const { return buf.shape[0]; }
  const char* base() const { return static_cast<const char*>(buf.buf); }
  Py_ssize_t stride() const { return buf.strides[0]; }
};

template <class T>
inline int64_t load(const char* item) {
  T v;
  std::memcpy(&v, item, sizeof v);
  return static_cast<int64_t>(v);
}

// The pass itself, for one combination of column types (T: t's, A: x's and y's, P: p's).
template <class T, class A, class P>
bool ingest_rows(const Column& t, const Column& x, const Column& y, const Column& p, bool two_d,
                 int64_t width, int64_t height, bool have_last, int64_t prev, int32_t* tok,
                 int32_t* gap) {
  const Py_ssize_t n = t.size();
  const char *tp = t.base(), *xp = x.base(), *yp = two_d ? y.base() : nullptr;
  const char* pp = two_d ? p.base() : nullptr;
  const Py_ssize_t ts = t.stride(), xs = x.stride(), ys = two_d ? y.stride() : 0;
  const Py_ssize_t ps = two_d ? p.stride() : 0;
  bool ok = true;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int64_t ti = load<T>(tp + i * ts), xi = load<A>(xp + i * xs);
    if (std::is_same<T, uint64_t>::value && ti < 0) return false;  // beyond int64
    if (i == 0 && !have_last) prev = ti;
    int64_t dt;
    ok &= !__builtin_sub_overflow(ti, prev, &dt) & (dt >= 0) & (xi >= 0) & (xi < width);
    int64_t token = xi;
    if (two_d) {
      const int64_t yi = load<A>(yp + i * ys), pi = load<P>(pp + i * ps);
      ok &= (yi >= 0) & (yi < height) & (pi >= 0) & (pi < 2);
      token += width * (yi + height * pi);
    }
    tok[i] = static_cast<int32_t>(token);
    gap[i] = static_cast<int32_t>(std::min<int64_t>(dt, INT32_MAX));
    prev = ti;
  }
  return ok;
}

PyObject* py_ingest(PyObject*, PyObject* args) {
  PyObject *t_o, *x_o, *y_o, *p_o, *last_o, *tokens_o, *gaps_o;
  long long width, height;
  if (!PyArg_ParseTuple(args, "OOOOLLOOO", &t_o, &x_o, &y_o, &p_o, &width, &height, &last_o,
                        &tokens_o, &gaps_o))
    return nullptr;
  const bool two_d = y_o != Py_None;
  Column t, x, y, p;
  View tokens, gaps;
  if (!t.get(t_o) || !x.get(x_o) || (two_d && (!y.get(y_o) || p_o == Py_None || !p.get(p_o))))
    Py_RETURN_FALSE;
  if (!tokens.get(tokens_o, "tokens", 'i', 1, true) || !gaps.get(gaps_o, "gaps", 'i', 1, true))
    return nullptr;
  const Py_ssize_t n = t.size();
  if (x.size() != n || (two_d && (y.size() != n || p.size() != n)) || tokens.dim(0) != n ||
      gaps.dim(0) != n)
    Py_RETURN_FALSE;
  const bool have_last = last_o != Py_None;
  int64_t prev = have_last ? PyLong_AsLongLong(last_o) : 0;
  if (have_last && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  int32_t* tok = tokens.data<int32_t>();
  int32_t* gap = gaps.data<int32_t>();
  const ColumnKind tk = t.kind, ak = x.kind;
  const ColumnKind pk = two_d ? p.kind : COL_U8;
  if (two_d && y.kind != ak) Py_RETURN_FALSE;
  bool ok = false;
  // A packet of a few thousand events takes microseconds: keep the GIL (giving it up costs
  // more, and taking it back may wait for another thread); let go of it for long ones.
  PyThreadState* released = n > 16384 ? PyEval_SaveThread() : nullptr;
  // The wire's forms: packed records (t uint64), bins (t int64), arrays of integers (all int64).
  if (tk == COL_U64 && ak == COL_U16 && pk == COL_U8)
    ok = ingest_rows<uint64_t, uint16_t, uint8_t>(t, x, y, p, two_d, width, height, have_last,
                                                   prev, tok, gap);
  else if (tk == COL_I64 && ak == COL_U16 && pk == COL_U8)
    ok = ingest_rows<int64_t, uint16_t, uint8_t>(t, x, y, p, two_d, width, height, have_last,
                                                  prev, tok, gap);
  else if (tk == COL_I64 && ak == COL_I64 && (pk == COL_I64 || !two_d))
    ok = ingest_rows<int64_t, int64_t, int64_t>(t, x, y, p, two_d, width, height, have_last,
                                                 prev, tok, gap);
  if (released) PyEval_RestoreThread(released);
  if (ok) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* py_prime(PyObject*, PyObject*) {
  helpers().prime();
  Py_RETURN_NONE;
}

// {"version", "header_fields", "layer_fields", "header": names, "layer": names, "codes":
// {"pool", "head", "norm", "gelu": names in code order}}: the plan's layout, read by
// models/native.py to place and code each field.
PyObject* py_plan_layout(PyObject*, PyObject*) {
  auto names = [](const char* const* items, int n) -> PyObject* {
    PyObject* tuple = PyTuple_New(n);
    for (int i = 0; tuple && i < n; ++i) {
      PyObject* name = PyUnicode_FromString(items[i]);
      if (!name) {
        Py_DECREF(tuple);
        return nullptr;
      }
      PyTuple_SET_ITEM(tuple, i, name);
    }
    return tuple;
  };
  PyObject* parts[] = {names(kHeaderNames, H_NAMED), names(kLayerNames, L_NAMED),
                       names(kPoolModeNames, POOL_MODES), names(kHeadModeNames, HEAD_MODES),
                       names(kNormNames, NORMS), names(kGeluNames, GELUS)};
  for (PyObject* part : parts) {
    if (!part) {
      for (PyObject* other : parts) Py_XDECREF(other);
      return nullptr;
    }
  }
  return Py_BuildValue("{s:i,s:i,s:i,s:N,s:N,s:{s:N,s:N,s:N,s:N}}", "version", kVersion,
                       "header_fields", H_FIELDS, "layer_fields", L_FIELDS, "header", parts[0],
                       "layer", parts[1], "codes", "pool", parts[2], "head", parts[3], "norm",
                       parts[4], "gelu", parts[5]);
}

PyObject* py_park(PyObject*, PyObject*) {
  Helpers* pool = the_helpers.load(std::memory_order_acquire);
  if (pool) pool->park();
  Py_RETURN_NONE;
}

// The helpers' Linux thread ids, for their CPU clocks; empty before the first step or prime
// (the helpers start with it) and with one native thread.
PyObject* py_helper_threads(PyObject*, PyObject*) {
  Helpers* pool = the_helpers.load(std::memory_order_acquire);
  std::vector<long> ids;
  if (pool) ids = pool->thread_ids();
  PyObject* out = PyList_New(0);
  if (!out) return nullptr;
  for (long id : ids) {
    if (id <= 0) continue;
    PyObject* item = PyLong_FromLong(id);
    if (!item || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return out;
}

PyMethodDef methods[] = {
    {"step", py_step, METH_VARARGS,
     "step(weights, plan, pool, slots, tokens, gaps, starts, lengths, logits, ready): advance "
     "sessions in place on their packed state rows, session b by tokens/gaps[starts[b] :"
     " starts[b] + lengths[b]]"},
    {"plan_layout", py_plan_layout, METH_NOARGS,
     "plan_layout() -> dict: the plan's version, block sizes and field names in plan order"},
    {"prime", py_prime, METH_NOARGS,
     "prime(): wake the step's helper threads ahead of a step (they spin briefly, then sleep)"},
    {"park", py_park, METH_NOARGS,
     "park(): no step follows at once; the helper threads sleep when idle instead of spinning"},
    {"helper_threads", py_helper_threads, METH_NOARGS,
     "helper_threads() -> list[int]: the Linux thread ids of the step's helper threads"},
    {"ingest", py_ingest, METH_VARARGS,
     "ingest(t, x, y, p, width, height, last_t, tokens, gaps) -> bool: validate and tokenise a "
     "packet's columns in one pass (False: invalid or unsupported; use the reference)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "evssm_native_step", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_evssm_native_step() { return PyModule_Create(&module); }
