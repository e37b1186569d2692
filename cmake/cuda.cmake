# The optional CUDA module, fusedopt._cuda. Included from CMakeLists.txt unless
# FUSEDOPT_CUDA is OFF. AUTO builds it when a CUDA compiler is found and skips it
# quietly otherwise; ON makes a missing compiler a configure error, so that a
# build that must ship the module (CI, GPU wheels) cannot silently lose it.

set(_fo_cuda_modes AUTO ON OFF)
if(NOT FUSEDOPT_CUDA IN_LIST _fo_cuda_modes)
  message(FATAL_ERROR "FUSEDOPT_CUDA must be AUTO, ON or OFF, got '${FUSEDOPT_CUDA}'")
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(FUSEDOPT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FUSEDOPT_CUDA=ON but no CUDA compiler was found; "
                        "put nvcc on PATH or set CMAKE_CUDA_COMPILER")
  endif()
  message(STATUS "fusedopt: no CUDA compiler found, building without fusedopt._cuda")
  return()
endif()

option(FUSEDOPT_PTXAS_VERBOSE "Print ptxas register and spill counts for the CUDA kernels" OFF)

# Default targets: A100 machine code, and H100 machine code plus compute_90 PTX
# that newer GPUs JIT-compile at load time. Not "native": it fails on a build
# machine without a GPU, which is the usual case (CI). Not sm_70: CUDA 13 dropped
# Volta. A user's -DCMAKE_CUDA_ARCHITECTURES=... or CUDAARCHS wins.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
endif()

# The static runtime makes the module depend only on the driver (libcuda.so),
# which it opens lazily on the first CUDA call: `import fusedopt._cuda` then
# works on a machine with no GPU and no driver, and no libcudart of a matching
# version has to be installed next to the wheel.
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
message(STATUS "fusedopt: building fusedopt._cuda with ${CMAKE_CUDA_COMPILER} "
               "(${CMAKE_CUDA_COMPILER_VERSION}) for ${CMAKE_CUDA_ARCHITECTURES}")

pybind11_add_module(_cuda csrc/bindings_cuda.cu)
set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)

# --fmad=false: nvcc otherwise contracts a*b+c into one fused multiply-add, which
# rounds once instead of twice. The CPU kernels are built with -ffp-contract=off
# (FO_MATH_FLAGS), so with this flag the CPU and the GPU round every operation
# of a rule the same way and their results agree bit for bit. nvcc's defaults
# already give IEEE division and square root (-prec-div, -prec-sqrt) and keep
# denormals (-ftz=false), as the CPU does.
target_compile_options(_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 --fmad=false -Xcompiler=-fPIC>)
if(FUSEDOPT_PTXAS_VERBOSE)
  target_compile_options(_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
endif()

install(TARGETS _cuda DESTINATION fusedopt)
