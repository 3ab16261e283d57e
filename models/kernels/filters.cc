// Input filters, the native pass (models/filters.py is the specification and the NumPy
// reference; its docstring has the definitions, this file follows them event for event).
//
// apply(t, tokens, keep, width, height, planes, refractory_us, denoise_us, max_rate,
//       refractory, denoise, scalars) -> (removed_refractory, removed_denoise, removed_rate)
//
//   t        int64[N]   event times, non-decreasing, not before scalars[LAST_T]
//   tokens   int32[N]   x + W y + W H p (2-D, planes = 2) or the channel (1-D, height = planes = 1)
//   keep     uint8[N]   written: 1 where the event passes every enabled filter
//   refractory, denoise  int64[W H] per-pixel times (None where that filter is off), in place
//   scalars  int64[4]   LAST_T, BUCKET_T, CREDIT, and a spare word, in place
//
// Integer arithmetic only, so the reference and this pass agree bit for bit. A packet that
// breaks the contract (a time going back, a token off the sensor) raises ValueError before any
// state is written. Filters that are off cost nothing; 0 disables one.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t NEVER = std::numeric_limits<int64_t>::min();
constexpr int64_t UNIT = 1000000;      // credit of one event, in event-microseconds per second
constexpr int64_t REFILL_CLAMP = UNIT;  // longest gap that can still matter: cap / rate <= 1 s
enum Scalar { LAST_T = 0, BUCKET_T = 1, CREDIT = 2, SCALARS = 4 };

struct Buffer {
  Py_buffer buf{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&buf);
  }
  // A C-contiguous 1-d buffer of `size`-byte items of struct code in `codes`.
  bool get(PyObject* obj, const char* name, Py_ssize_t size, const char* codes, bool writable) {
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf, flags) != 0) {
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s 1-d array", name,
                   writable ? " writable" : "");
      return false;
    }
    held = true;
    const char* fmt = buf.format ? buf.format : "B";
    const char code = fmt[std::strlen(fmt) - 1];
    if (buf.ndim != 1 || buf.itemsize != size || std::strchr(codes, code) == nullptr ||
        fmt[0] == '>' || fmt[0] == '!') {
      PyErr_Format(PyExc_ValueError, "%s: expected a 1-d array of %zd-byte items (%s)", name,
                   size, codes);
      return false;
    }
    return true;
  }
  Py_ssize_t size() const { return buf.shape[0]; }
  template <class T>
  T* data() const { return static_cast<T*>(buf.buf); }
};

struct Params {
  int64_t width, height, pixels;
  uint64_t refractory_us, denoise_us;
  int64_t max_rate, cap;
};

// The latest time any of the pixel's 8 neighbours (2 on a 1-D sensor, height 1) was seen.
inline int64_t support(const int64_t* seen, int64_t a, const Params& g) {
  const int64_t x = a % g.width, y = a / g.width;
  int64_t latest = NEVER;
  for (int64_t dy = -1; dy <= 1; ++dy) {
    const int64_t yy = y + dy;
    if (yy < 0 || yy >= g.height) continue;
    for (int64_t dx = -1; dx <= 1; ++dx) {
      const int64_t xx = x + dx;
      if ((dx == 0 && dy == 0) || xx < 0 || xx >= g.width) continue;
      const int64_t s = seen[yy * g.width + xx];
      if (s > latest) latest = s;
    }
  }
  return latest;
}

// The chain over one packet; returns the three removal counts through `removed`.
void run(const int64_t* t, const int32_t* tok, uint8_t* keep, Py_ssize_t n, const Params& g,
         int64_t* kept_at, int64_t* seen, int64_t* sc, int64_t removed[3]) {
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int64_t ti = t[i], a = tok[i] % g.pixels;
    keep[i] = 0;
    if (kept_at) {
      const int64_t last = kept_at[a];
      if (last != NEVER && static_cast<uint64_t>(ti) - static_cast<uint64_t>(last) < g.refractory_us) {
        ++removed[0];
        continue;
      }
      kept_at[a] = ti;
    }
    if (seen) {
      const int64_t s = support(seen, a, g);
      seen[a] = ti;
      if (s == NEVER || static_cast<uint64_t>(ti) - static_cast<uint64_t>(s) >= g.denoise_us) {
        ++removed[1];
        continue;
      }
    }
    if (g.max_rate > 0) {
      if (sc[BUCKET_T] != NEVER) {
        uint64_t gap = static_cast<uint64_t>(ti) - static_cast<uint64_t>(sc[BUCKET_T]);
        if (gap > static_cast<uint64_t>(REFILL_CLAMP)) gap = REFILL_CLAMP;
        const int64_t credit = sc[CREDIT] + static_cast<int64_t>(gap) * g.max_rate;
        sc[CREDIT] = credit < g.cap ? credit : g.cap;
      }
      sc[BUCKET_T] = ti;
      if (sc[CREDIT] < UNIT) {
        ++removed[2];
        continue;
      }
      sc[CREDIT] -= UNIT;
    }
    keep[i] = 1;
  }
}

PyObject* py_apply(PyObject*, PyObject* args) {
  PyObject *t_o, *tok_o, *keep_o, *refr_o, *den_o, *sc_o;
  long long width, height, planes, refractory_us, denoise_us, max_rate;
  if (!PyArg_ParseTuple(args, "OOOLLLLLLOOO", &t_o, &tok_o, &keep_o, &width, &height, &planes,
                        &refractory_us, &denoise_us, &max_rate, &refr_o, &den_o, &sc_o))
    return nullptr;
  if (width <= 0 || height <= 0 || (planes != 1 && planes != 2) || refractory_us < 0 ||
      denoise_us < 0 || max_rate < 0 || max_rate > 1000000000LL ||
      width * height * planes > INT32_MAX) {
    PyErr_SetString(PyExc_ValueError, "filters: geometry or parameters outside what the native "
                                      "pass implements (planes 1 or 2, max_rate <= 1e9)");
    return nullptr;
  }
  Buffer t, tok, keep, refr, den, sc;
  if (!t.get(t_o, "t", 8, "ql", false) || !tok.get(tok_o, "tokens", 4, "il", false) ||
      !keep.get(keep_o, "keep", 1, "B?b", true) || !sc.get(sc_o, "scalars", 8, "ql", true))
    return nullptr;
  const Params g{width, height, width * height, static_cast<uint64_t>(refractory_us),
                 static_cast<uint64_t>(denoise_us), max_rate,
                 max_rate * 1000 > UNIT ? max_rate * 1000 : UNIT};
  const Py_ssize_t n = t.size();
  if (tok.size() != n || keep.size() != n || sc.size() != SCALARS) {
    PyErr_SetString(PyExc_ValueError, "filters: t, tokens and keep must have one length, "
                                      "scalars 4 items");
    return nullptr;
  }
  if ((refractory_us > 0) != (refr_o != Py_None) || (denoise_us > 0) != (den_o != Py_None)) {
    PyErr_SetString(PyExc_ValueError, "filters: a state array for each enabled per-pixel filter, "
                                      "None for each disabled one");
    return nullptr;
  }
  if (refr_o != Py_None && !refr.get(refr_o, "refractory", 8, "ql", true)) return nullptr;
  if (den_o != Py_None && !den.get(den_o, "denoise", 8, "ql", true)) return nullptr;
  if ((refr.held && refr.size() != g.pixels) || (den.held && den.size() != g.pixels)) {
    PyErr_Format(PyExc_ValueError, "filters: per-pixel state must have %lld items",
                 static_cast<long long>(g.pixels));
    return nullptr;
  }
  const int64_t* tp = t.data<int64_t>();
  const int32_t* kp = tok.data<int32_t>();
  int64_t* scp = sc.data<int64_t>();
  // The contract first, so a refused packet leaves the state as it was.
  int64_t prev = scp[LAST_T];
  const int64_t tokens = g.pixels * planes;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (tp[i] < prev) {
      PyErr_Format(PyExc_ValueError, "filters: event %zd at t=%lld us goes back in time (after "
                   "%lld us)", i, static_cast<long long>(tp[i]), static_cast<long long>(prev));
      return nullptr;
    }
    if (kp[i] < 0 || kp[i] >= tokens) {
      PyErr_Format(PyExc_ValueError, "filters: event %zd has token %d, outside 0..%lld", i, kp[i],
                   static_cast<long long>(tokens - 1));
      return nullptr;
    }
    prev = tp[i];
  }
  int64_t removed[3] = {0, 0, 0};
  PyThreadState* released = n > 16384 ? PyEval_SaveThread() : nullptr;
  run(tp, kp, keep.data<uint8_t>(), n, g, refr.held ? refr.data<int64_t>() : nullptr,
      den.held ? den.data<int64_t>() : nullptr, scp, removed);
  if (released) PyEval_RestoreThread(released);
  scp[LAST_T] = prev;
  return Py_BuildValue("(LLL)", static_cast<long long>(removed[0]),
                       static_cast<long long>(removed[1]), static_cast<long long>(removed[2]));
}

PyMethodDef methods[] = {
    {"apply", py_apply, METH_VARARGS,
     "apply(t, tokens, keep, width, height, planes, refractory_us, denoise_us, max_rate, "
     "refractory, denoise, scalars) -> removed counts: the input filters over one packet"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "evssm_native_filters", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_evssm_native_filters() { return PyModule_Create(&module); }
