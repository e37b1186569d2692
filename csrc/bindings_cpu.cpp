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
#include "tables.h"

static_assert(fo::tables::kInt8Block == int(fo::DType::Int8Block),
              "tables.h and layouts.h disagree on the code of 8-bit state");

namespace py = pybind11;

namespace {

using fo::cpu::Table;
using Launch = bool (*)(std::string_view, const fo::cpu::Layout&, const Table&, const double*,
                        std::int64_t, const fo::Mode&, int);
using LaunchRows = bool (*)(std::string_view, const fo::cpu::Layout&, const Table&,
                           const fo::cpu::RowsTable&, const double*, std::int64_t, const fo::Mode&,
                           int);
using LaunchFactored = bool (*)(std::string_view, const fo::cpu::Layout&, const Table&,
                               const fo::cpu::FactoredShape*, const double*, std::int64_t,
                               const fo::Mode&, int);
using Dot = double (*)(fo::DType, const Table&, int);
using Quantize = void (*)(bool, const float*, std::int64_t, fo::q8*, float*, int);
using Dequantize = void (*)(bool, const fo::q8*, const float*, std::int64_t, float*, int);

int g_num_threads = 0;  // 0: OpenMP's default

int num_threads() { return g_num_threads > 0 ? g_num_threads : omp_get_max_threads(); }

std::string g_isa;
Launch g_launch = nullptr;
LaunchRows g_launch_rows = nullptr;
LaunchFactored g_launch_factored = nullptr;
Dot g_dot = nullptr, g_sumsq = nullptr;
int (*g_vector_bits)() = nullptr;
Quantize g_quantize = nullptr;
Dequantize g_dequantize = nullptr;

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
    g_launch = c::isa_avx512::launch, g_launch_rows = c::isa_avx512::launch_rows,
    g_launch_factored = c::isa_avx512::launch_factored, g_dot = c::isa_avx512::dot,
    g_sumsq = c::isa_avx512::sumsq, g_vector_bits = c::isa_avx512::vector_bits,
    g_quantize = c::isa_avx512::quantize, g_dequantize = c::isa_avx512::dequantize;
#endif
  } else if (isa == "avx2") {
#if defined(FO_HAVE_ISA_AVX2)
    g_launch = c::isa_avx2::launch, g_launch_rows = c::isa_avx2::launch_rows,
    g_launch_factored = c::isa_avx2::launch_factored, g_dot = c::isa_avx2::dot,
    g_sumsq = c::isa_avx2::sumsq, g_vector_bits = c::isa_avx2::vector_bits,
    g_quantize = c::isa_avx2::quantize, g_dequantize = c::isa_avx2::dequantize;
#endif
  } else if (isa == "base") {
#if defined(FO_HAVE_ISA_BASE)
    g_launch = c::isa_base::launch, g_launch_rows = c::isa_base::launch_rows,
    g_launch_factored = c::isa_base::launch_factored, g_dot = c::isa_base::dot,
    g_sumsq = c::isa_base::sumsq, g_vector_bits = c::isa_base::vector_bits,
    g_quantize = c::isa_base::quantize, g_dequantize = c::isa_base::dequantize;
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
          int extra, double grad_scale, bool stochastic, std::uint64_t key, double step_count, double l1,
          double ema_decay, std::uint32_t unsigned_states) {
  if (!(ptrs.flags() & py::array::c_style) || !(sizes.flags() & py::array::c_style) ||
      !(hyper.flags() & py::array::c_style))
    throw std::invalid_argument(kernel + ": pointer, size and hyperparameter arrays must be contiguous");
  const int ns = num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  const std::int64_t n = sizes.size();
  if (n == 0) return;
  // 8-bit state: a scale array per state after the other slots (no EMA slot with it)
  const bool int8 = state_dtype == int(fo::DType::Int8Block);
  const bool ema = (extra & fo::kEmaBit) != 0;
  if (int8 && ema)
    throw std::invalid_argument(kernel + ": no EMA slot with 8-bit state");
  const std::int64_t nslots = 2 + ns + ((extra & 3) != 0 ? 1 : 0) + (ema ? 1 : 0) + (int8 ? ns : 0);
  if (ptrs.size() != nslots * n)
    throw std::invalid_argument(kernel + ": pointer table has " + std::to_string(ptrs.size()) +
                                " entries, expected " + std::to_string(nslots) + " slots x " +
                                std::to_string(n) + " tensors");
  Table t{ptrs.data(), sizes.data(), n};
  const fo::cpu::Layout layout{dtype, state_dtype < 0 ? dtype : state_dtype, extra};
  const fo::Mode mode{grad_scale, stochastic ? 1.0 : 0.0, key, step_count, l1, ema_decay,
                      unsigned_states};
  const double* h = hyper.data();
  const std::int64_t nh = hyper.size();
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  g_launch(kernel, layout, t, h, nh, mode, nt);
}

// A row-sparse step: `kernel` on the rows rows[j][0..counts[j]) of each tensor j (rows
// of row_len[j] elements, distinct indices), the gradient slot holding counts[j] rows of
// values per tensor. No EMA slot.
void step_rows(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
               py::array_t<std::uint64_t, 0> rows, py::array_t<std::int64_t, 0> counts,
               py::array_t<std::int64_t, 0> row_len, py::array_t<double, 0> hyper,
               int state_dtype, int extra, double grad_scale, bool stochastic, std::uint64_t key,
               double step_count) {
  for (const py::array* a : {static_cast<py::array*>(&ptrs), static_cast<py::array*>(&rows),
                             static_cast<py::array*>(&counts), static_cast<py::array*>(&row_len),
                             static_cast<py::array*>(&hyper)})
    if (!(a->flags() & py::array::c_style))
      throw std::invalid_argument(kernel + ": table arrays must be contiguous");
  const int ns = num_states(kernel);
  if (ns < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
  if ((extra & fo::kEmaBit) != 0)
    throw std::invalid_argument(kernel + ": a row-sparse step has no EMA slot");
  if (state_dtype == int(fo::DType::Int8Block))
    throw std::invalid_argument(kernel + ": a row-sparse step has no 8-bit state");
  int reductions = 0;
  fo::with_rule(kernel, [&](auto rule) { reductions = fo::reduce_count<decltype(rule)>(); });
  if (reductions > 0)
    throw std::invalid_argument(kernel + ": a two-pass rule has no row-sparse step");
  const std::int64_t n = counts.size();
  if (rows.size() != n || row_len.size() != n)
    throw std::invalid_argument(kernel + ": rows, counts and row_len must have one entry per tensor");
  if (n == 0) return;
  const std::int64_t nslots = 2 + ns + (extra != 0 ? 1 : 0);
  if (ptrs.size() != nslots * n)
    throw std::invalid_argument(kernel + ": pointer table has " + std::to_string(ptrs.size()) +
                                " entries, expected " + std::to_string(nslots) + " slots x " +
                                std::to_string(n) + " tensors");
  for (std::int64_t j = 0; j < n; ++j)
    if (counts.data()[j] < 0 || row_len.data()[j] < 0)
      throw std::invalid_argument(kernel + ": negative count or row length");
  Table t{ptrs.data(), nullptr, n};
  const fo::cpu::RowsTable r{rows.data(), counts.data(), row_len.data()};
  const fo::cpu::Layout layout{dtype, state_dtype < 0 ? dtype : state_dtype, extra};
  const fo::Mode mode{grad_scale, stochastic ? 1.0 : 0.0, key, step_count};
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  g_launch_rows(kernel, layout, t, r, hyper.data(), hyper.size(), mode, nt);
}

// A factored step (Adafactor): tensor j is a stack of batch[j] matrices of rows[j] x
// cols[j] (rows[j] == 0: an unfactored tensor of cols[j] elements); pointer table slots:
// param, grad, row factors (or a vector's second moment), column factors (0 for vectors).
void step_factored(const std::string& kernel, int dtype, py::array_t<std::uint64_t, 0> ptrs,
                   py::array_t<std::int64_t, 0> shapes, py::array_t<double, 0> hyper,
                   int state_dtype, double grad_scale, double step_count) {
  for (const py::array* a : {static_cast<py::array*>(&ptrs), static_cast<py::array*>(&shapes),
                             static_cast<py::array*>(&hyper)})
    if (!(a->flags() & py::array::c_style))
      throw std::invalid_argument(kernel + ": table arrays must be contiguous");
  bool known = false;
  fo::with_factored_rule(kernel, [&](auto) { known = true; });
  if (!known) throw std::invalid_argument("unknown factored kernel '" + kernel + "'");
  if (state_dtype == int(fo::DType::Int8Block))
    throw std::invalid_argument(kernel + ": a factored step has no 8-bit state");
  if (shapes.size() % 3 != 0)
    throw std::invalid_argument(kernel + ": shapes must hold (batch, rows, cols) per tensor");
  const std::int64_t n = shapes.size() / 3;
  if (ptrs.size() != 4 * n)
    throw std::invalid_argument(kernel + ": pointer table has " + std::to_string(ptrs.size()) +
                                " entries, expected 4 slots x " + std::to_string(n) + " tensors");
  const auto* shape = reinterpret_cast<const fo::cpu::FactoredShape*>(shapes.data());
  for (std::int64_t j = 0; j < n; ++j)
    if (shape[j].batch < 0 || shape[j].rows < 0 || shape[j].cols < 0)
      throw std::invalid_argument(kernel + ": negative extent for tensor " + std::to_string(j));
  if (n == 0) return;
  Table t{ptrs.data(), nullptr, n};
  const fo::cpu::Layout layout{dtype, state_dtype < 0 ? dtype : state_dtype, 0};
  const fo::Mode mode{grad_scale, 0.0, 0, step_count};
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  g_launch_factored(kernel, layout, t, shape, hyper.data(), hyper.size(), mode, nt);
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

// Blockwise 8-bit codes and scales of a float32 array (quant8.h), with the kernels of the
// selected instruction set: (uint8 codes of x's shape, float32 scales, one per block).
py::tuple quantize_blockwise(py::array_t<float, py::array::c_style> x,
                             bool is_signed) {
  const std::int64_t n = x.size();
  py::array_t<std::uint8_t> codes(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  py::array_t<float> scales(fo::quant_blocks(n));
  const int nt = num_threads();
  {
    py::gil_scoped_release nogil;
    g_quantize(is_signed, x.data(), n, reinterpret_cast<fo::q8*>(codes.mutable_data()),
               scales.mutable_data(), nt);
  }
  return py::make_tuple(codes, scales);
}

// The float32 values of blockwise 8-bit codes and their scales.
py::array_t<float> dequantize_blockwise(py::array_t<std::uint8_t, py::array::c_style> codes,
                                        py::array_t<float, py::array::c_style> scales,
                                        bool is_signed) {
  const std::int64_t n = codes.size();
  if (scales.size() != fo::quant_blocks(n))
    throw std::invalid_argument("dequantize_blockwise: " + std::to_string(n) + " codes need " +
                                std::to_string(fo::quant_blocks(n)) + " scales, got " +
                                std::to_string(scales.size()));
  py::array_t<float> out(std::vector<py::ssize_t>(codes.shape(), codes.shape() + codes.ndim()));
  const int nt = num_threads();
  {
    py::gil_scoped_release nogil;
    g_dequantize(is_signed, reinterpret_cast<const fo::q8*>(codes.data()), scales.data(), n,
                 out.mutable_data(), nt);
  }
  return out;
}

// The tables of a code map (quant8.h), for tests and references.
py::dict quant_tables(bool is_signed) {
  const fo::QuantMap& q = is_signed ? fo::kQuantSigned : fo::kQuantUnsigned;
  py::dict d;
  d["code"] = py::array_t<float>(256, q.code);
  d["thr"] = py::array_t<float>(16, q.thr);
  d["mul"] = py::array_t<float>(16, q.mul);
  d["sub"] = py::array_t<float>(16, q.sub);
  d["cap"] = py::array_t<float>(16, q.cap);
  d["first"] = py::array_t<std::int32_t>(32, q.first);
  d["floor"] = fo::kQuantFloor;
  return d;
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

// Fills `stride` columns per object (describe's seven, and zeros beyond).
void describe_into(py::sequence seq, std::int64_t* out, int stride) {
  const py::ssize_t n = py::len(seq);
  auto& api = py::detail::npy_api::get();
  for (py::ssize_t i = 0; i < n; ++i) {
    std::int64_t* r = out + i * stride;
    for (int c = 0; c < stride; ++c) r[c] = 0;
    py::object o = seq[i];
    if (!api.PyArray_Check_(o.ptr())) continue;
    auto* a = py::detail::array_proxy(o.ptr());
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    std::int64_t size = 1;
    for (int k = 0; k < a->nd; ++k) size *= a->dimensions[k];
    const int f = a->flags;
    std::int64_t flags = kIsNdarray;
    if (f & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) flags |= kCContig;
    if (f & py::detail::npy_api::NPY_ARRAY_WRITEABLE_) flags |= kWriteable;
    if (f & py::detail::npy_api::NPY_ARRAY_ALIGNED_) flags |= kAligned;
    if (d->byteorder != '>') flags |= kNative;  // '<', '=' and '|' are native on x86
    r[0] = std::int64_t(reinterpret_cast<std::uintptr_t>(a->data));
    r[1] = size;
    r[2] = py::reinterpret_borrow<py::array>(o).itemsize();
    r[3] = d->type_num;
    r[4] = flags;
    r[5] = std::int64_t(shape_hash(a->dimensions, a->nd));
    r[6] = a->nd;
  }
}

// One row per object: [address, element count, itemsize, NumPy type number,
// flags, shape hash, ndim]. Objects that are not NumPy arrays get flags 0 and
// are described by the Python layer instead.
py::array_t<std::int64_t> describe(py::sequence seq) {
  const py::ssize_t n = py::len(seq);
  py::array_t<std::int64_t> out({n, py::ssize_t(7)});
  describe_into(seq, out.mutable_data(), 7);
  return out;
}

// The data addresses of a list of torch tensors, read by `reader`, the address of a
// function `void* (PyObject*)` that torch exports for compiled code (a tensor's
// data_ptr() without Python's method call). None when an item is None or the reader
// throws (a tensor without storage): the caller then reads the addresses in Python.
py::object tensor_addresses(std::uintptr_t reader, py::list tensors) {
  using Reader = void* (*)(PyObject*);
  const auto read = reinterpret_cast<Reader>(reader);
  const py::ssize_t n = PyList_GET_SIZE(tensors.ptr());
  py::array_t<std::uint64_t> out(n);
  std::uint64_t* a = out.mutable_data();
  try {
    for (py::ssize_t i = 0; i < n; ++i) {
      PyObject* t = PyList_GET_ITEM(tensors.ptr(), i);
      if (t == Py_None) return py::none();
      a[i] = std::uint64_t(reinterpret_cast<std::uintptr_t>(read(t)));
    }
  } catch (...) {
    return py::none();
  }
  return std::move(out);
}

// dicts[i][key] = value for every dict of a list, through the dict's own slot
// (PyDict_SetItem): a subclass's __setitem__, which counts the write in the optimizer's
// log (`_engine.StateDict`), is not called: the step counts the optimizer itself
// advances are not changes it has to look for.
void set_entries(py::list dicts, py::object key, py::object value) {
  const py::ssize_t n = PyList_GET_SIZE(dicts.ptr());
  for (py::ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts.ptr(), i);
    if (!PyDict_Check(d)) throw py::type_error("set_entries: the list holds a non-dict");
  }
  for (py::ssize_t i = 0; i < n; ++i)
    if (PyDict_SetItem(PyList_GET_ITEM(dicts.ptr(), i), key.ptr(), value.ptr()) != 0)
      throw py::error_already_set();
}

// Rows of several lists at once, as one (lists x n x 8) array: `describe`'s columns
// and a device column of 0 (host memory), for the lists of one call. Returns the rows,
// the number of objects that are not NumPy arrays (left for the Python layer) and the
// number of NumPy arrays that are not C-contiguous.
py::tuple describe_lists(py::sequence lists, py::ssize_t n) {
  const py::ssize_t L = py::len(lists);
  py::array_t<std::int64_t> out({L, n, py::ssize_t(8)});
  std::int64_t* r = out.mutable_data();
  for (py::ssize_t k = 0; k < L; ++k) {
    py::sequence seq = lists[k];
    if (py::len(seq) != n) throw std::invalid_argument("describe_lists: lists of unequal length");
    describe_into(seq, r + k * n * 8, 8);
  }
  std::int64_t foreign = 0, strided = 0;
  for (py::ssize_t j = 0; j < L * n; ++j) {
    const std::int64_t flags = r[j * 8 + 4];
    foreign += flags == 0;
    strided += flags != 0 && !(flags & kCContig);
  }
  return py::make_tuple(out, foreign, strided);
}

// The Tables of a call, for Python: its issue as a tuple, its groups as arrays that
// view the tables' own memory (so `set_grads` updates what a kept plan runs on).
class PyTables {
 public:
  PyTables(py::array_t<std::int64_t, py::array::c_style> rows, int nstates, int extra,
           bool read_only, std::int64_t bf16_numpy, bool row_grads, int nscales)
      : t_(rows.data(), int(rows.shape(0)), rows.shape(1),
           fo::tables::Layout{nstates, extra & 3, read_only, (extra & fo::kEmaBit) != 0,
                              row_grads, nscales, fo::kQuantBlock},
           fo::tables::Dtypes{11, 12, 23, bf16_numpy, -2, 2}) {
    if (rows.ndim() != 3 || rows.shape(2) != 8)
      throw std::invalid_argument("Tables: rows must be lists x n x 8");
  }

  static py::object issue_of(const fo::tables::Issue& i) {
    if (i.what == fo::tables::What::None) return py::none();
    return py::make_tuple(int(i.what), i.list, i.index, i.list2, i.index2);
  }

  py::object issue() const { return issue_of(t_.issue()); }

  py::list groups(py::object self) {
    py::list out;
    for (auto& g : t_.groups()) {
      py::array_t<std::uint64_t> ptrs({py::ssize_t(g.ptrs.size())}, {sizeof(std::uint64_t)},
                                      g.ptrs.data(), self);
      py::array_t<std::int64_t> sizes({py::ssize_t(g.sizes.size())}, {sizeof(std::int64_t)},
                                      g.sizes.data(), self);
      out.append(py::make_tuple(g.param, g.state, ptrs, sizes));
    }
    return out;
  }

  py::list group_tensors() const {
    py::list out;
    for (const auto& g : t_.groups())  // (copies)
      out.append(py::array_t<std::int64_t>(py::ssize_t(g.tensors.size()), g.tensors.data()));
    return out;
  }

  py::object set_grads(py::array_t<std::int64_t, py::array::c_style> rows) {
    if (rows.size() != t_.size() * 8) throw std::invalid_argument("set_grads: expected n x 8 rows");
    return issue_of(t_.set_grads(rows.data()));
  }

  py::object set_grad_ptrs(py::array_t<std::uint64_t, py::array::c_style> ptrs) {
    if (ptrs.size() != t_.size()) throw std::invalid_argument("set_grad_ptrs: expected n addresses");
    return issue_of(t_.set_grad_ptrs(ptrs.data()));
  }

 private:
  fo::tables::Tables t_;
};

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedopt CPU kernels (OpenMP, SIMD)";
  select_isa("auto");
  m.def("step", &step, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        py::arg("hyper"), py::arg("state_dtype") = -1, py::arg("extra") = 0,
        py::arg("grad_scale") = 1.0, py::arg("stochastic") = false, py::arg("key") = 0,
        py::arg("step") = 1.0, py::arg("l1") = 0.0, py::arg("ema_decay") = 0.0,
        py::arg("unsigned_states") = 0u,
        "Run `kernel` over the tensors of a pointer table (slots x tensors), in place. `hyper`\n"
        "holds the rule's hyperparameters once, or once per tensor (n x size). `dtype` and\n"
        "`state_dtype` are storage codes (0 float32, 1 float64, 2 float16, 3 bfloat16; -1: as\n"
        "dtype); `extra` 1 adds a float32 master-weight slot, 2 a Kahan compensation slot.\n"
        "Gradients are multiplied by `grad_scale`; `stochastic` rounds 16-bit params\n"
        "stochastically with the random stream `key`. `step` is the count t after this update,\n"
        "from which the rule fills its per-step scalars (bias corrections, decayed rates).\n"
        "`l1` > 0 applies the L1 proximal step p = sign(p) max(|p| - l1, 0) after the rule.\n"
        "`extra` + 4 adds an EMA slot (the params' dtype, after the extra buffer's), moved\n"
        "toward the stored params as torch.lerp(ema, p, 1 - ema_decay); ema_decay 0 copies.\n"
        "`state_dtype` 4: 8-bit states (uint8 codes), whose float32 scales (one per block of\n"
        "256 elements of each tensor) follow the other slots of the table, one slot per\n"
        "state; bit k of `unsigned_states` makes state k use the unsigned code table. 8-bit\n"
        "states take no EMA slot.");
  m.def("step_rows", &step_rows, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"),
        py::arg("rows"), py::arg("counts"), py::arg("row_len"), py::arg("hyper"), py::kw_only(),
        py::arg("state_dtype") = -1, py::arg("extra") = 0, py::arg("grad_scale") = 1.0,
        py::arg("stochastic") = false, py::arg("key") = 0, py::arg("step") = 1.0,
        "Run `kernel` on the rows a row-sparse gradient touches, in place: tensor j's rows\n"
        "rows[j] (the address of counts[j] distinct int64 indices) of row_len[j] elements each,\n"
        "with the gradient slot of the pointer table holding counts[j] rows of values. The\n"
        "other rows of the params and states are not read or written. Otherwise as `step`\n"
        "(no EMA slot, no L1 step, no 8-bit state); stochastic rounding draws per (tensor, row)\n"
        "streams.");
  m.def("step_factored", &step_factored, py::arg("kernel"), py::arg("dtype"), py::arg("ptrs"),
        py::arg("shapes"), py::arg("hyper"), py::kw_only(), py::arg("state_dtype") = -1,
        py::arg("grad_scale") = 1.0, py::arg("step") = 1.0,
        "A factored second-moment step (Adafactor) over the tensors of a 4-slot pointer table\n"
        "(param, grad, row factors or a vector's second moment, column factors): `shapes`\n"
        "holds (batch, rows, cols) per tensor, rows 0 for an unfactored tensor of cols\n"
        "elements. Three passes over the elements (csrc/cpu/factored.h); the same bits for\n"
        "every thread count.");
  m.def("quantize_blockwise", &quantize_blockwise, py::arg("x").noconvert(), py::arg("signed"),
        "(uint8 codes, float32 scales) of x in blocks of 256: the kernels' encoding.");
  m.def("dequantize_blockwise", &dequantize_blockwise, py::arg("codes").noconvert(), py::arg("scales").noconvert(),
        py::arg("signed"), "float32 values of blockwise 8-bit codes: the kernels' decoding.");
  m.def("quant_tables", &quant_tables, py::arg("signed"),
        "The code table and the encoder's tables of the signed or unsigned code map.");
  m.attr("QUANT_BLOCK") = fo::kQuantBlock;
  m.def("dot", &dot, py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        "Sum over tensor pairs of their dot products (pointer table: 2 x n), in double.");
  m.def("sumsq", &sumsq, py::arg("dtype"), py::arg("ptrs"), py::arg("sizes"),
        "Sum of squares over tensors (pointer table: 1 x n), in double.");
  m.def("describe_lists", &describe_lists, py::arg("lists"), py::arg("n"),
        "(rows, foreign, strided): the rows of several lists of n objects, (lists, n, 8), the\n"
        "device column 0; how many objects are not NumPy arrays; how many NumPy arrays are\n"
        "not C-contiguous.");
  py::class_<PyTables>(m, "Tables",
                       "The checked rows of a call and its pointer tables (csrc/tables.h).")
      .def(py::init<py::array_t<std::int64_t, py::array::c_style>, int, int, bool,
                    std::int64_t, bool, int>(),
           py::arg("rows"), py::arg("nstates"), py::arg("extra"), py::arg("read_only"),
           py::arg("bf16_num"), py::arg("row_grads") = false, py::arg("nscales") = 0,
           "extra: 0, 1 (master weights) or 2 (Kahan buffers), plus 4 when the list after\n"
           "the extra buffers is the EMA of the params; row_grads: list 1 holds row-sparse\n"
           "gradient values, whose shapes are not compared with the params'; nscales: 8-bit\n"
           "states, whose block scales are the last nscales lists")
      .def_property_readonly("issue", &PyTables::issue,
                             "None, or (what, list, index, list2, index2) of the first failed "
                             "check")
      .def("groups", [](py::object self) { return self.cast<PyTables&>().groups(self); },
           "[(param code, state code, pointer table, sizes)], viewing the tables' memory")
      .def("group_tensors", &PyTables::group_tensors,
           "[indices of the call's arrays in each group], aligned with groups()")
      .def("set_grads", &PyTables::set_grads, py::arg("rows"),
           "Exchange the gradients (their n x 8 rows); None, or the issue (nothing changed)")
      .def("set_grad_ptrs", &PyTables::set_grad_ptrs, py::arg("ptrs"),
           "Exchange the gradients' addresses only; None, or the overlap issue");
  m.def("tensor_addresses", &tensor_addresses, py::arg("reader"), py::arg("tensors"),
        "uint64 data addresses of a list of torch tensors through torch's exported reader\n"
        "(the address of a `void* (PyObject*)` function); None when an item is None or the\n"
        "reader fails.");
  m.def("set_entries", &set_entries, py::arg("dicts"), py::arg("key"), py::arg("value"),
        "dicts[i][key] = value for a list of dicts, through dict's own slot (a subclass's\n"
        "__setitem__ is not called).");
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
    auto take = [&](auto rule) { names = fo::hyper_field_names<typename decltype(rule)::Hyper>(); };
    const bool known = fo::with_rule(kernel, take) || fo::with_factored_rule(kernel, take);
    if (!known) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return py::make_tuple(py::tuple(py::cast(names.first)), py::tuple(py::cast(names.second)));
  }, py::arg("kernel"),
        "(fields the host fills, fields the rule fills per step) of a kernel's Hyper, by\n"
        "name, in memory order: the hyperparameter array holds them in this order.");
  m.def("hyper_size", [](const std::string& kernel) {
    int n = -1;
    auto take = [&](auto rule) { n = fo::hyper_size<decltype(rule)>(); };
    if (!fo::with_rule(kernel, take)) fo::with_factored_rule(kernel, take);
    if (n < 0) throw std::invalid_argument("unknown kernel '" + kernel + "'");
    return n;
  });
  m.attr("FLAG_NDARRAY") = int(kIsNdarray);
  m.attr("FLAG_C_CONTIGUOUS") = int(kCContig);
  m.attr("FLAG_WRITEABLE") = int(kWriteable);
  m.attr("FLAG_NATIVE") = int(kNative);
  m.attr("FLAG_ALIGNED") = int(kAligned);
}
