// fusedopt._cpu: the CPU kernels and a fast array inspector for NumPy arrays.
// The Python layer validates every argument before calling `step`; this module
// only checks what it needs to run safely (table shapes, hyperparameter count).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/layouts.h"
#include "core/rules.h"
#include "cpu/kernels.h"

namespace py = pybind11;

namespace {

using fo::cpu::Table;
using Launch = bool (*)(std::string_view, const fo::cpu::Layout&, const Table&, const double*,
                        std::int64_t, const fo::Mode&, int);
using Dot = double (*)(fo::DType, const Table&, int);

int g_num_threads = 0;  // 0: OpenMP's default

int num_threads() { return g_num_threads > 0 ? g_num_threads : omp_get_max_threads(); }

std::string g_isa;
Launch g_launch = nullptr;
Dot g_dot = nullptr, g_sumsq = nullptr;
int (*g_vector_bits)() = nullptr;

// The instruction sets this build compiled the kernels for (all three unless a
// development build narrowed FUSEDOPT_ISAS).
#if defined(FO_HAVE_ISA_AVX512)
constexpr bool kBuilt512 = true;
#else
constexpr bool kBuilt512 = false;
#endif
#if defined(FO_HAVE_ISA_AVX2)
constexpr bool kBuilt2 = true;
#else
constexpr bool kBuilt2 = false;
#endif
#if defined(FO_HAVE_ISA_BASE)
constexpr bool kBuiltBase = true;
#else
constexpr bool kBuiltBase = false;
#endif

void select_isa(const std::string& want) {
  __builtin_cpu_init();
  const bool has2 = kBuilt2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool has512 = kBuilt512 && __builtin_cpu_supports("avx2") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  std::string isa = want;
  if (isa.empty() || isa == "auto") isa = has512 ? "avx512" : has2 ? "avx2" : "base";
  if ((isa == "avx512" && !has512) || (isa == "avx2" && !has2) || (isa == "base" && !kBuiltBase))
    throw std::invalid_argument("this CPU or build does not support " + isa);
  namespace c = fo::cpu;
  if (isa == "avx512") {
#if defined(FO_HAVE_ISA_AVX512)
    g_launch = c::isa_avx512::launch, g_dot = c::isa_avx512::dot, g_sumsq = c::isa_avx512::sumsq,
    g_vector_bits = c::isa_avx512::vector_bits;
#endif
  } else if (isa == "avx2") {
#if defined(FO_HAVE_ISA_AVX2)
    g_launch = c::isa_avx2::launch, g_dot = c::isa_avx2::dot, g_sumsq = c::isa_avx2::sumsq,
    g_vector_bits = c::isa_avx2::vector_bits;
#endif
  } else if (isa == "base") {
#if defined(FO_HAVE_ISA_BASE)
    g_launch = c::isa_base::launch, g_dot = c::isa_base::dot, g_sumsq = c::isa_base::sumsq,
    g_vector_bits = c::isa_base::vector_bits;
#endif
  } else {
    throw std::invalid_argument("unknown instruction set '" + isa + "' (avx512, avx2, base)");
  }
  g_isa = isa;
}

// Number of state buffers of `kernel`, or -1 for an unknown name.
int num_states(const std::string& kernel) {
  int n = -1;
  fo::with_rule(kernel, [&](auto rule) { n = decltype(rule)::kStates; });
  return n;
}

void step(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
          py::array_t<std::int64_t, 0> sizes, py::array_t<double, 0> hyper, int state_dtype,
          int extra, double grad_scale, bool stochastic, std::uint64_t key, double step_count, double l1) {
  if (!(ptrs.flags() & py::array::c_style) || !(sizes.flags() & py::array::c_style) ||
      !(hyper.flags() & py::array::c_style))
    throw std::invalid_argument(kernel + ": pointer, size and hyperparameter arrays must be contiguous");
  const int ns = num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  const std::int64_t n = sizes.size();
  if (n == 0) return;
  const std::int64_t nslots = 2 + ns + (extra != 0 ? 1 : 0);
  if (ptrs.size() != nslots * n)
    throw std::invalid_argument(kernel + ": pointer table has " + std::to_string(ptrs.size()) +
                                " entries, expected " + std::to_string(nslots) + " slots x " +
                                std::to_string(n) + " tensors");
  Table t{ptrs.data(), sizes.data(), n};
  const fo::cpu::Layout layout{dtype, state_dtype < 0 ? dtype : state_dtype, extra};
  const fo::Mode mode{grad_scale, stochastic ? 1.0 : 0.0, key, step_count, l1};
  const double* h = hyper.data();
  const std::int64_t nh = hyper.size();
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  g_launch(kernel, layout, t, h, nh, mode, nt);
}

// The reductions' checks: a known dtype and a table of `slots` x n pointers.
Table reduction_table(const char* name, int dtype, int slots, const py::array_t<std::uint64_t, 0>& ptrs,
                      const py::array_t<std::int64_t, 0>& sizes) {
  const std::int64_t n = sizes.size();
  if (!(ptrs.flags() & py::array::c_style) || !(sizes.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": pointer and size arrays must be contiguous");
  if (ptrs.size() != slots * n)
    throw std::invalid_argument(std::string(name) + ": pointer table must be " +
                                std::to_string(slots) + " x n");
  if (dtype < 0 || dtype > 3)
    throw std::invalid_argument(std::string(name) + ": unsupported dtype code " + std::to_string(dtype));
  return Table{ptrs.data(), sizes.data(), n};
}

// Sum of a_j . b_j over the tensor pairs of a two-slot table, accumulated in double;
// the same value for every thread count and instruction set.
double dot(int dtype, py::array_t<std::uint64_t, 0> ptrs, py::array_t<std::int64_t, 0> sizes) {
  const Table t = reduction_table("dot", dtype, 2, ptrs, sizes);
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  return g_dot(fo::DType(dtype), t, nt);
}

// Sum of squares over the tensors of a one-slot table, likewise.
double sumsq(int dtype, py::array_t<std::uint64_t, 0> ptrs, py::array_t<std::int64_t, 0> sizes) {
  const Table t = reduction_table("sumsq", dtype, 1, ptrs, sizes);
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  return g_sumsq(fo::DType(dtype), t, nt);
}

// FNV-1a over the rank and the extents: equal shapes give equal hashes, so the
// Python layer compares shapes of thousands of arrays as one integer column.
std::uint64_t shape_hash(const py::ssize_t* dims, int nd) {
  std::uint64_t hash = 1469598103934665603ull ^ std::uint64_t(nd);
  for (int k = 0; k < nd; ++k) hash = (hash ^ std::uint64_t(dims[k])) * 1099511628211ull;
  return hash;
}

// Flags of `describe`.
enum : std::int64_t { kIsNdarray = 1, kCContig = 2, kWriteable = 4, kNative = 8, kAligned = 16 };

// One row per object: [address, element count, itemsize, NumPy type number,
// flags, shape hash, ndim]. Objects that are not NumPy arrays get flags 0 and
// are described by the Python layer instead.
py::array_t<std::int64_t> describe(py::sequence seq) {
  const py::ssize_t n = py::len(seq);
  py::array_t<std::int64_t> out({n, py::ssize_t(7)});
  auto r = out.mutable_unchecked<2>();
  auto& api = py::detail::npy_api::get();
  for (py::ssize_t i = 0; i < n; ++i) {
    py::object o = seq[i];
    for (int c = 0; c < 7; ++c) r(i, c) = 0;
    if (!api.PyArray_Check_(o.ptr())) continue;
    auto* a = py::detail::array_proxy(o.ptr());
    const auto arr = py::reinterpret_borrow<py::array>(o);
    const py::dtype dt = arr.dtype();
    std::int64_t size = 1;
    for (int k = 0; k < a->nd; ++k) size *= a->dimensions[k];
    const int f = a->flags;
    std::int64_t flags = kIsNdarray;
    if (f & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) flags |= kCContig;
    if (f & py::detail::npy_api::NPY_ARRAY_WRITEABLE_) flags |= kWriteable;
    if (f & py::detail::npy_api::NPY_ARRAY_ALIGNED_) flags |= kAligned;
    if (dt.byteorder() != '>') flags |= kNative;  // '<', '=' and '|' are native on x86
    r(i, 0) = std::int64_t(reinterpret_cast<std::uintptr_t>(a->data));
    r(i, 1) = size;
    r(i, 2) = arr.itemsize();
    r(i, 3) = dt.num();
    r(i, 4) = flags;
    r(i, 5) = std::int64_t(shape_hash(a->dimensions, a->nd));
    r(i, 6) = a->nd;
  }
  return out;
}


// The common case of `_arrays.prepare` in one pass over the objects: every array a
// NumPy array and every check passing. `lists` holds params, grads, the `nstates`
// state lists and, with `extra_kind` != 0, the master-weight or Kahan list, all of
// the same length. Returns the kernels' groups as (param code, state code, pointer
// table, sizes) in ascending (param, state) order, or None when the call needs the
// Python layer: a foreign array, a strided gradient to copy, or an error to diagnose.
py::object prepare_numpy(py::sequence lists, int nstates, int extra_kind, bool read_only,
                         int bf16_num) {
  auto& api = py::detail::npy_api::get();
  constexpr int kF32 = 11, kF64 = 12, kF16 = 23;  // NumPy's type numbers
  auto code_of = [&](int t) {
    return t == kF32 ? 0 : t == kF64 ? 1 : t == kF16 ? 2 : t == bf16_num ? 3 : -1;
  };
  const py::ssize_t L = py::len(lists);
  std::vector<py::object> fast;  // the lists as tuples or lists, owned
  for (py::ssize_t k = 0; k < L; ++k) {
    PyObject* f = PySequence_Fast(py::object(lists[k]).ptr(), "prepare: not a sequence");
    if (f == nullptr) throw py::error_already_set();
    fast.push_back(py::reinterpret_steal<py::object>(f));
  }
  const py::ssize_t n = PySequence_Fast_GET_SIZE(fast[0].ptr());
  for (const auto& f : fast)
    if (PySequence_Fast_GET_SIZE(f.ptr()) != n) return py::none();
  const int ext = extra_kind != 0 ? int(L) - 1 : -1;
  std::vector<std::uint64_t> ptr(static_cast<std::size_t>(L * n));
  std::vector<std::int64_t> size(static_cast<std::size_t>(n));
  std::vector<int> key(static_cast<std::size_t>(n));
  constexpr int kWritten = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ |
                           py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  for (py::ssize_t i = 0; i < n; ++i) {
    py::detail::PyArray_Proxy* a[64];
    if (L > 64) return py::none();
    for (py::ssize_t k = 0; k < L; ++k) {
      PyObject* o = PySequence_Fast_GET_ITEM(fast[std::size_t(k)].ptr(), i);
      if (!api.PyArray_Check_(o)) return py::none();
      a[k] = py::detail::array_proxy(o);
      if (py::detail::array_descriptor_proxy(a[k]->descr)->byteorder == '>') return py::none();
      const int need = k == 1 || read_only ? py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ : kWritten;
      if ((a[k]->flags & need) != need) return py::none();
      if (k > 0) {
        if (a[k]->nd != a[0]->nd) return py::none();
        for (int d = 0; d < a[0]->nd; ++d)
          if (a[k]->dimensions[d] != a[0]->dimensions[d]) return py::none();
      }
      ptr[std::size_t(k * n + i)] = std::uint64_t(reinterpret_cast<std::uintptr_t>(a[k]->data));
    }
    auto type = [&](py::ssize_t k) { return py::detail::array_descriptor_proxy(a[k]->descr)->type_num; };
    const int t0 = type(0), code = code_of(t0);
    if (code < 0 || type(1) != t0) return py::none();
    int scode = code < 2 ? code : 0;  // no states: float32 for 16-bit params
    if (nstates > 0) {
      const int ts = type(2);
      if (code < 2 ? ts != t0 : (ts != kF32 && ts != bf16_num)) return py::none();
      for (int k = 3; k < 2 + nstates; ++k)
        if (type(k) != ts) return py::none();
      scode = code_of(ts);
    }
    if (ext >= 0 && (code < 2 || type(ext) != (extra_kind == 1 ? kF32 : t0))) return py::none();
    std::int64_t count = 1;
    for (int d = 0; d < a[0]->nd; ++d) count *= a[0]->dimensions[d];
    size[std::size_t(i)] = count;
    key[std::size_t(i)] = code * 4 + scode;
  }
  if (!read_only) {
    // no two written arrays may overlap, nor a gradient a written array
    std::vector<std::pair<std::uint64_t, std::uint64_t>> w;  // [start, end) of written
    w.reserve(std::size_t((L - 1) * n));
    auto bytes = [&](py::ssize_t k, py::ssize_t i) {
      const int c = key[std::size_t(i)];
      const int code = k == 1 || k == 0 ? c / 4 : k == ext ? (extra_kind == 1 ? 0 : c / 4) : c % 4;
      return std::uint64_t(size[std::size_t(i)]) * (code == 1 ? 8u : code == 0 ? 4u : 2u);
    };
    for (py::ssize_t k = 0; k < L; ++k) {
      if (k == 1) continue;
      for (py::ssize_t i = 0; i < n; ++i) {
        if (size[std::size_t(i)] == 0) continue;
        const std::uint64_t s = ptr[std::size_t(k * n + i)];
        w.emplace_back(s, s + bytes(k, i));
      }
    }
    std::sort(w.begin(), w.end());
    for (std::size_t j = 1; j < w.size(); ++j)
      if (w[j].first < w[j - 1].second) return py::none();
    for (py::ssize_t i = 0; i < n && !w.empty(); ++i) {
      if (size[std::size_t(i)] == 0) continue;
      const std::uint64_t s = ptr[std::size_t(n + i)], e = s + bytes(1, i);
      // the written array with the largest start below the gradient's end
      auto it = std::lower_bound(w.begin(), w.end(), std::make_pair(e, std::uint64_t(0)));
      if (it != w.begin() && std::prev(it)->second > s) return py::none();
    }
  }
  std::vector<int> keys(key);
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  py::list groups;
  for (const int k : keys) {
    std::vector<py::ssize_t> sel;
    for (py::ssize_t i = 0; i < n; ++i)
      if (key[std::size_t(i)] == k) sel.push_back(i);
    const py::ssize_t m = py::ssize_t(sel.size());
    py::array_t<std::uint64_t> table(L * m);
    py::array_t<std::int64_t> sizes(m);
    std::uint64_t* tp = table.mutable_data();
    std::int64_t* sp = sizes.mutable_data();
    for (py::ssize_t j = 0; j < m; ++j) {
      sp[j] = size[std::size_t(sel[std::size_t(j)])];
      for (py::ssize_t s = 0; s < L; ++s) tp[s * m + j] = ptr[std::size_t(s * n + sel[std::size_t(j)])];
    }
    groups.append(py::make_tuple(k / 4, k % 4, table, sizes));
  }
  return std::move(groups);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedopt CPU kernels (OpenMP, SIMD)";
  select_isa("auto");
  m.def("step", &step, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        py::arg("hyper"), py::kw_only(), py::arg("state_dtype") = -1, py::arg("extra") = 0,
        py::arg("grad_scale") = 1.0, py::arg("stochastic") = false, py::arg("key") = 0,
        py::arg("step") = 1.0, py::arg("l1") = 0.0,
        "Run `kernel` over the tensors of a pointer table (slots x tensors), in place. `hyper`\n"
        "holds the rule's hyperparameters once, or once per tensor (n x size). `dtype` and\n"
        "`state_dtype` are storage codes (0 float32, 1 float64, 2 float16, 3 bfloat16; -1: as\n"
        "dtype); `extra` 1 adds a float32 master-weight slot, 2 a Kahan compensation slot.\n"
        "Gradients are multiplied by `grad_scale`; `stochastic` rounds 16-bit params\n"
        "stochastically with the random stream `key`. `step` is the count t after this update,\n"
        "from which the rule fills its per-step scalars (bias corrections, decayed rates).\n"
        "`l1` > 0 applies the L1 proximal step p = sign(p) max(|p| - l1, 0) after the rule.");
  m.def("dot", &dot, py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        "Sum over tensor pairs of their dot products (pointer table: 2 x n), in double.");
  m.def("sumsq", &sumsq, py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        "Sum of squares over tensors (pointer table: 1 x n), in double.");
  m.def("prepare_numpy", &prepare_numpy, py::arg("lists"), py::arg("nstates"),
        py::arg("extra_kind"), py::arg("read_only"), py::arg("bf16_num"),
        "Validate NumPy-only step lists and build the pointer tables in one pass; None when\n"
        "the general path is needed (foreign arrays, strided gradients, any error).");
  m.def("describe", &describe, py::arg("arrays"),
        "Rows of [address, size, itemsize, type number, flags, shape hash, ndim].");
  m.def("shape_hash", [](const std::vector<py::ssize_t>& shape) {
    return std::int64_t(shape_hash(shape.data(), int(shape.size())));
  }, py::arg("shape"), "The shape hash `describe` reports, for arrays described elsewhere.");
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
    g_num_threads = n;
  });
  m.def("get_num_threads", &num_threads);
  m.def("set_isa", &select_isa, py::arg("isa"),
        "Select the instruction set of the kernels: 'auto', 'avx512', 'avx2' or 'base'.");
  m.def("get_isa", [] { return g_isa; });
  m.def("built_isas", [] {
    py::list out;
    if (kBuiltBase) out.append("base");
    if (kBuilt2) out.append("avx2");
    if (kBuilt512) out.append("avx512");
    return out;
  }, "The instruction sets this build compiled the kernels for.");
  m.def("vector_bits", [] { return g_vector_bits(); },
        "The vector width the selected instruction set's kernels were compiled for.");
  m.def("num_states", &num_states, py::arg("kernel"));
  m.def("num_reductions", [](const std::string& kernel) {
    int n = -1;
    fo::with_rule(kernel, [&](auto rule) { n = fo::reduce_count<decltype(rule)>(); });
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  }, py::arg("kernel"),
        "Per-tensor sums the kernel's first pass computes before its update (0: one pass).");
  m.def("first_pass_slots", [](const std::string& kernel) {
    int n = -1;
    fo::with_rule(kernel, [&](auto rule) { n = fo::reduce_slots<decltype(rule)>(); });
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  }, py::arg("kernel"),
        "Arrays per tensor the kernel's first pass reads (p, g and maybe the states; 0: one\n"
        "pass): its bytes per element are this times the storage size.");
  m.def("random_bits", [](std::uint64_t key, std::int64_t j, std::uint64_t i) {
    return fo::random_bits(fo::tensor_key(key, j), i);
  }, "The random bits element i of tensor j draws with stochastic rounding under `key`.");
  m.def("step_key", &fo::step_key, py::arg("seed"), py::arg("step"),
        "The random stream (`key`) of step `step` for a seed, as the CUDA kernels derive it\n"
        "from a step count kept on the device.");
  m.def("hyper_fields", [](const std::string& kernel) {
    std::pair<std::vector<std::string>, std::vector<std::string>> names;
    const bool known = fo::with_rule(kernel, [&](auto rule) {
      names = fo::hyper_field_names<typename decltype(rule)::Hyper>();
    });
    if (!known) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return py::make_tuple(py::tuple(py::cast(names.first)), py::tuple(py::cast(names.second)));
  }, py::arg("kernel"),
        "(fields the host fills, fields the rule fills per step) of a kernel's Hyper, by\n"
        "name, in memory order: the hyperparameter array holds them in this order.");
  m.def("hyper_size", [](const std::string& kernel) {
    int n = -1;
    fo::with_rule(kernel, [&](auto rule) { n = fo::hyper_size<decltype(rule)>(); });
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  });
  m.attr("FLAG_NDARRAY") = int(kIsNdarray);
  m.attr("FLAG_C_CONTIGUOUS") = int(kCContig);
  m.attr("FLAG_WRITEABLE") = int(kWriteable);
  m.attr("FLAG_NATIVE") = int(kNative);
  m.attr("FLAG_ALIGNED") = int(kAligned);
}
