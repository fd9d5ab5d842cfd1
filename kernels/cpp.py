"""Build a C++ extension on first use (torch.utils.cpp_extension), or say once why not and return None."""
import functools
import logging
import os
import shutil

log = logging.getLogger("paritylab.kernels")


def cxx() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would call ($CXX, else c++), if it is on the PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def build(name: str, source: str, functions: tuple[str, ...]):
    """The compiled module ``name`` (cached across runs by PyTorch), or None with one warning where no
    C++ toolchain can build it; callers then take their eager PyTorch path."""
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline(name, cpp_sources=source, functions=list(functions),
                           extra_cflags=["-O3", "-march=native", "-fopenmp-simd"])
    except Exception as error:  # no compiler, no headers, a read-only cache: the eager path remains
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        log.warning("%s: building the C++ extension failed (%s: %s); using the eager PyTorch path",
                    name, type(error).__name__, first_line)
        return None
