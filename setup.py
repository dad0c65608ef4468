"""Optional ahead-of-time build of memnb's C++/CUDA ops as `memnb._C`.

`pyproject.toml` stays the project's configuration; this file only adds `ext_modules`, and only when asked:

    MEMNB_BUILD_EXT=1 pip install --no-build-isolation -e .

(`--no-build-isolation` so the extension is built against the installed torch). Without `MEMNB_BUILD_EXT=1` nothing
is compiled and memnb builds its kernels just in time on first use (`memnb.ops.load_extension`).
CUDA sources are built only when torch has CUDA and a CUDA toolkit is found (`CUDA_HOME`).
"""
import os
from glob import glob
from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get('MEMNB_BUILD_EXT') == '1':
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
    cpp = sorted(glob('memnb/csrc/*.cpp'))
    cu = sorted(glob('memnb/csrc/*.cu'))
    import platform
    # AVX2+FMA by default on x86-64 (Haswell/Zen and later); MEMNB_CXX_ARCH='' for a fully portable build
    arch = os.environ.get('MEMNB_CXX_ARCH', '-march=x86-64-v3' if platform.machine() == 'x86_64' else '').split()
    args = dict(extra_compile_args={'cxx': ['-O3', '-fopenmp', '-fno-math-errno', *arch], 'nvcc': ['-O3', '--expt-relaxed-constexpr']},
                extra_link_args=['-fopenmp'])
    if torch.version.cuda and CUDA_HOME and cu: ext_modules = [CUDAExtension('memnb._C', cpp + cu, **args)]
    else: ext_modules = [CppExtension('memnb._C', cpp, extra_compile_args=args['extra_compile_args']['cxx'], extra_link_args=args['extra_link_args'])]
    cmdclass = {'build_ext': BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
