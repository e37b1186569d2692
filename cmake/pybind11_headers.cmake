# Compile against a copy of pybind11's headers in the build directory.
#
# pip builds each install in a new temporary environment, so pybind11's headers
# lie under a new path every time (/tmp/pip-build-env-XXXX/...). Every compile
# command names that path, so a second `pip install .` of the same checkout (with
# another extra, say) would find every command changed, and the old path gone,
# and recompile everything although nothing changed. The copy has a fixed path,
# and a header is rewritten only when its content differs, so an object is rebuilt
# only when pybind11 itself changed.

set(_fo_pybind11_src "${pybind11_INCLUDE_DIR}")
set(_fo_pybind11_dst "${CMAKE_BINARY_DIR}/pybind11-include")
file(GLOB_RECURSE _fo_pybind11_headers RELATIVE "${_fo_pybind11_src}"
     "${_fo_pybind11_src}/pybind11/*")
if(NOT _fo_pybind11_headers)
  message(FATAL_ERROR "no pybind11 headers under '${_fo_pybind11_src}'")
endif()
foreach(_header IN LISTS _fo_pybind11_headers)
  get_filename_component(_dir "${_fo_pybind11_dst}/${_header}" DIRECTORY)
  file(MAKE_DIRECTORY "${_dir}")
  file(COPY_FILE "${_fo_pybind11_src}/${_header}" "${_fo_pybind11_dst}/${_header}"
       ONLY_IF_DIFFERENT)
endforeach()
set_property(TARGET pybind11::pybind11_headers PROPERTY INTERFACE_INCLUDE_DIRECTORIES
             "${_fo_pybind11_dst}")
