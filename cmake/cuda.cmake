# The optional CUDA module, fusedopt._cuda: whether to build it, and its targets.
#
# FUSEDOPT_CUDA=AUTO (the default) builds it when a CUDA compiler and an NVIDIA GPU
# are both found: compiling the kernels takes longer than the rest of the package,
# and without a GPU the module could not run. ON builds it whenever a compiler is
# found, GPU or not, and makes a missing compiler a configure error, so that a
# build that must ship the module (CI, GPU wheels built on machines without a GPU)
# cannot silently lose it. OFF never builds it.
#
# Sets FO_CUDA_BUILT (TRUE or FALSE) and FO_CUDA_WHY, the reason, for the summary
# line of CMakeLists.txt.

# The GPU generations the kernels are compiled for, in one place: A100 machine
# code, and H100 machine code plus compute_90 PTX that newer GPUs JIT-compile at
# load time. Not "native": it fails on a build machine without a GPU (CI). Not
# sm_70: CUDA 13 dropped Volta. -DCMAKE_CUDA_ARCHITECTURES=... or the CUDAARCHS
# environment variable replaces this list.
set(FO_CUDA_ARCHITECTURES "80-real;90")

set(FO_CUDA_BUILT FALSE)
set(_fo_cuda_modes AUTO ON OFF)
if(NOT FUSEDOPT_CUDA IN_LIST _fo_cuda_modes)
  message(FATAL_ERROR "FUSEDOPT_CUDA must be AUTO, ON or OFF, got '${FUSEDOPT_CUDA}'")
endif()
if(FUSEDOPT_CUDA STREQUAL "OFF")
  set(FO_CUDA_WHY "FUSEDOPT_CUDA=OFF")
  return()
endif()

# The cheap signs of an NVIDIA GPU: its device node (Linux, and containers given a
# GPU), the driver's list of GPUs, or nvidia-smi's (WSL and other setups).
function(fo_find_gpu out)
  set(found "")
  file(GLOB driver_gpus LIST_DIRECTORIES true "/proc/driver/nvidia/gpus/*")
  if(EXISTS "/dev/nvidia0")
    set(found "/dev/nvidia0")
  elseif(driver_gpus)
    set(found "/proc/driver/nvidia/gpus")
  else()
    find_program(smi nvidia-smi NO_CACHE)
    if(smi)
      execute_process(COMMAND "${smi}" -L RESULT_VARIABLE rc OUTPUT_VARIABLE listed
                      ERROR_QUIET TIMEOUT 30)
      if(rc EQUAL 0 AND listed MATCHES "GPU [0-9]+:")
        set(found "nvidia-smi -L")
      endif()
    endif()
  endif()
  set(${out} "${found}" PARENT_SCOPE)
endfunction()

if(FUSEDOPT_CUDA STREQUAL "AUTO")
  fo_find_gpu(_fo_gpu)
  if(NOT _fo_gpu)
    string(CONCAT FO_CUDA_WHY "FUSEDOPT_CUDA=AUTO and no NVIDIA GPU found; "
           "FUSEDOPT_CUDA=ON builds _cuda without one")
    return()
  endif()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(FUSEDOPT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FUSEDOPT_CUDA=ON but no CUDA compiler was found; "
                        "put nvcc on PATH or set CMAKE_CUDA_COMPILER")
  endif()
  string(CONCAT FO_CUDA_WHY "FUSEDOPT_CUDA=AUTO: a GPU (${_fo_gpu}) but no CUDA compiler; "
         "put nvcc on PATH or set CMAKE_CUDA_COMPILER")
  return()
endif()

option(FUSEDOPT_PTXAS_VERBOSE "Print ptxas register and spill counts for the CUDA kernels" OFF)

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES "${FO_CUDA_ARCHITECTURES}")
endif()

# The static runtime makes the module depend only on the driver (libcuda.so),
# which it opens lazily on the first CUDA call: `import fusedopt._cuda` then
# works on a machine with no GPU and no driver, and no libcudart of a matching
# version has to be installed next to the wheel.
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
set(FO_CUDA_BUILT TRUE)
if(FUSEDOPT_CUDA STREQUAL "ON")
  set(FO_CUDA_WHY "FUSEDOPT_CUDA=ON")
else()
  set(FO_CUDA_WHY "FUSEDOPT_CUDA=AUTO: a GPU (${_fo_gpu}) and a CUDA compiler found")
endif()
string(APPEND FO_CUDA_WHY "; nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures "
       "${CMAKE_CUDA_ARCHITECTURES}")

# The update kernels are compiled in several objects from one source, one per
# group of layouts (fo::cuda::is_built and kernels.h list what each holds), so
# that a parallel build splits the work: params float32, float64, and float16 or
# bfloat16 params with float32 or bfloat16 states; float32, float16 and bfloat16
# params with 8-bit states (code 4). Each name is
# <suffix>:<param dtype code>:<state dtype code>.
set(FO_CUDA_VARIANTS f32:0:0 f64:1:1 f16_f32:2:0 f16_bf16:2:3 bf16_f32:3:0 bf16_bf16:3:3
    f32_q8:0:4 f16_q8:2:4 bf16_q8:3:4)

# --fmad=false: nvcc otherwise contracts a*b+c into one fused multiply-add, which
# rounds once instead of twice. The CPU kernels are built with -ffp-contract=off
# (FO_MATH_FLAGS), so with this flag the CPU and the GPU round every operation
# of a rule the same way and their results agree bit for bit. nvcc's defaults
# already give IEEE division and square root (-prec-div, -prec-sqrt) and keep
# denormals (-ftz=false), as the CPU does.
set(FO_CUDA_FLAGS -O3 --fmad=false -Xcompiler=-fPIC)
# A compile check, for a machine with nvcc and no GPU (CI): every kernel still goes
# through nvcc's front end, the device compiler and ptxas's check of the PTX, so a
# compile error fails as in a release build, but neither the device code nor the
# host code is optimized (about a third of the time). The module it builds runs
# correctly and slowly: not for use on a GPU.
option(FUSEDOPT_CUDA_CHECK_ONLY "Build the CUDA module unoptimized, only to check that it compiles" OFF)
if(FUSEDOPT_CUDA_CHECK_ONLY)
  set(CMAKE_CUDA_FLAGS_RELEASE "-DNDEBUG")
  set(FO_CUDA_FLAGS -O0 -Xcicc=-O0 --fmad=false -Xcompiler=-fPIC)
  string(APPEND FO_CUDA_WHY "; FUSEDOPT_CUDA_CHECK_ONLY: unoptimized, a compile check")
endif()
if(FUSEDOPT_PTXAS_VERBOSE)
  list(APPEND FO_CUDA_FLAGS -Xptxas=-v)
endif()

set(FO_CUDA_OBJECTS)
foreach(variant IN LISTS FO_CUDA_VARIANTS)
  string(REPLACE ":" ";" _fields "${variant}")
  list(GET _fields 0 _suffix)
  list(GET _fields 1 _param)
  list(GET _fields 2 _state)
  add_library(fo_cuda_${_suffix} OBJECT csrc/cuda/kernels.cu)
  target_compile_definitions(fo_cuda_${_suffix} PRIVATE FO_CUDA_NS=variant_${_suffix}
                             FO_CUDA_PARAM=${_param} FO_CUDA_STATE=${_state})
  target_compile_options(fo_cuda_${_suffix} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${FO_CUDA_FLAGS}>)
  list(APPEND FO_CUDA_OBJECTS $<TARGET_OBJECTS:fo_cuda_${_suffix}>)
endforeach()

pybind11_add_module(_cuda csrc/bindings_cuda.cu csrc/cuda/grad_stats.cu ${FO_CUDA_OBJECTS})
set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
target_compile_options(_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${FO_CUDA_FLAGS}>)

install(TARGETS _cuda DESTINATION fusedopt)
