"""The csr layer's fast CPU path: C++ kernels (``kernels/csr_cpu.cpp``) built once with
``torch.utils.cpp_extension`` and loaded as the ops ``torch.ops.synthprune.csr_spmm`` (forward and
input gradient), ``csr_backward`` (value gradient, with the input gradient in the same pass
when asked) and ``csr_spmm_relu`` / ``relu_dropout_backward`` (a layer with the ReLU and dropout
after it fused in), with ``torch.sparse`` as the fallback. ``narrow_linear`` and its backward
serve a narrow dense output layer after csr layers (``layers.DenseLinear``). The same library
holds the dropout that ``SparseMLP`` and ``SparseCNN`` use (``layers.Dropout``; ``nn.Dropout``
where it is not built).

Which path is used: ``SYNTHPRUNE_CSR_KERNEL`` = ``auto`` (default: the kernel where it builds,
else ``torch.sparse``), ``fast`` (the kernel or an error) or ``torch`` (always ``torch.sparse``).
``describe()`` says which and why; ``synthprune list`` and ``synthprune bench`` print it.

The build needs a C++ compiler and ninja and takes ~20 s, once: the library lands in PyTorch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), named by the
CPU's vector extension (avx512, avx2 or generic, as PyTorch detects it), so a cache shared
between machines never runs code their CPU lacks; ``ATEN_CPU_CAPABILITY=avx2`` picks a
narrower one. ``make setup`` builds it; otherwise the first csr product does.

Both paths compute the same products to float rounding (``tests/test_csr_kernel.py``). What the
kernel gains, per product and per training step, is in ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from synthprune.files import FolderLock

ENV = "SYNTHPRUNE_CSR_KERNEL"
POLICIES = ("auto", "fast", "torch")
SOURCE = Path(__file__).resolve().parent / "kernels" / "csr_cpu.cpp"
KERNEL_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops": the op namespace or None, "reason": why not
_override: list[str] = []  # policies set by `forced`, innermost last


class KernelUnavailable(RuntimeError):
    """``SYNTHPRUNE_CSR_KERNEL=fast`` was asked for and the kernel cannot be built or loaded."""


def policy() -> str:
    """The path asked for: by ``forced``, else in ``SYNTHPRUNE_CSR_KERNEL`` (``auto`` when unset)."""
    if _override:
        return _override[-1]
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise KernelUnavailable(f"{ENV}={value!r} is not one of {', '.join(POLICIES)}")
    return value


@contextmanager
def forced(chosen: str) -> Iterator[None]:
    """Within the block, products take the path ``chosen`` (``auto``, ``fast`` or ``torch``)
    whatever the environment says: how the benchmark times both paths in one process."""
    if chosen not in POLICIES:
        raise ValueError(f"csr path must be one of {', '.join(POLICIES)}, got {chosen!r}")
    _override.append(chosen)
    try:
        yield
    finally:
        _override.pop()


def _vector_flags() -> tuple[str, list[str]]:
    """(name suffix, compiler flags) for the vector extensions this CPU has, as PyTorch sees them."""
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    if not sys.platform.startswith("linux"):
        return "generic", []
    if capability == "AVX512":  # PyTorch's AVX512 level: F, BW, VL and DQ, as here
        return "avx512", ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _build():
    """Build (or find already built) and load the kernel; returns ``torch.ops.synthprune``."""
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise KernelUnavailable("no C++ compiler found (install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise KernelUnavailable("ninja is not installed (pip install ninja)")
    suffix, flags = _vector_flags()
    name = f"synthprune_csr_{suffix}"
    folder = build_folder(name)
    if not any(folder.glob(f"{name}*.so")):
        print(f"synthprune: building the fast csr kernel once (~20 s) in {folder}", file=sys.stderr)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    with _one_builder(folder), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compiler-version notes from cpp_extension
        cpp_extension.load(
            name, [str(SOURCE)], extra_cflags=["-O3", *flags, *openmp], extra_ldflags=openmp,
            build_directory=str(folder), is_python_module=False, verbose=False)
    _register_fakes()
    return torch.ops.synthprune


def build_folder(name: str) -> Path:
    """Where the kernel is built: PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``, default
    ``~/.cache/torch_extensions``), a folder per Python and torch version (the library links
    against both), then ``name``."""
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}" / name


@contextmanager
def _one_builder(folder: Path) -> Iterator[None]:
    """One process at a time builds or loads the kernel in ``folder``. PyTorch's own guard is a
    lock *file* that a process killed mid-build (SIGKILL, a cluster's time limit) leaves behind,
    after which every later load waits for it forever. Ours is an ``flock``, which the kernel
    releases when its holder dies; whoever holds it knows that a leftover PyTorch lock file is
    stale, and removes it."""
    lock = FolderLock(folder, "csr kernel build folder").acquire(wait=True)
    try:
        (folder / "lock").unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def _register_fakes() -> None:
    """Shape-only versions of the ops, so ``torch.compile`` and ``torch.export`` can trace them."""
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @register("synthprune::csr_spmm")
    def _spmm(crow, col, values, perm, x_t, bias):
        return x_t.new_empty(crow.shape[0] - 1, x_t.shape[1])

    @register("synthprune::csr_spmm_relu")
    def _spmm_relu(crow, col, values, x_t, bias, p, seed):
        return x_t.new_empty(crow.shape[0] - 1, x_t.shape[1])

    @register("synthprune::relu_dropout_backward")
    def _relu_dropout_backward(grad_t, y_t, p, with_bias):
        return torch.empty_like(grad_t), grad_t.new_empty(grad_t.shape[0] if with_bias else 0)

    @register("synthprune::batch_minor")
    def _batch_minor(x):
        return x.new_empty(x.shape[1], x.shape[0])

    @register("synthprune::dropout")
    def _dropout(x, p, seed):
        return torch.empty_like(x)

    @register("synthprune::narrow_linear")
    def _narrow(weight, x_t, bias):
        return x_t.new_empty(x_t.shape[1], weight.shape[0])

    @register("synthprune::narrow_linear_backward")
    def _narrow_backward(weight, grad, x_t, with_input, with_weight, with_bias):
        return (x_t.new_empty(x_t.shape if with_input else (0, x_t.shape[1])),
                weight.new_empty(weight.shape if with_weight else (0, weight.shape[1])),
                weight.new_empty(weight.shape[0] if with_bias else 0))

    @register("synthprune::csr_backward")
    def _backward(t_crow, t_col, t_perm, values, grad_t, x_t, with_bias, with_input=True):
        return (x_t.new_empty(x_t.shape if with_input else (0, x_t.shape[1])), x_t.new_empty(values.shape[0]),
                x_t.new_empty(grad_t.shape[0] if with_bias else 0))


def ops():
    """``torch.ops.synthprune`` when the fast path is in use, else ``None`` (``torch.sparse``).

    Built or loaded on the first call, once per process. Raises ``KernelUnavailable`` only under
    ``SYNTHPRUNE_CSR_KERNEL=fast``."""
    chosen = policy()
    if chosen == "torch":
        return None
    if "ops" not in _state:  # checked again under the lock: one thread builds
        with _lock:
            if "ops" not in _state:
                try:
                    _state["ops"], _state["reason"] = _build(), ""
                except Exception as exc:  # any build or load failure means: fall back, and say why
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    _state["ops"], _state["reason"] = None, first
    if _state["ops"] is None and chosen == "fast":
        raise KernelUnavailable(f"the fast csr kernel is unavailable: {_state['reason']} ({ENV}=fast)")
    return _state["ops"]


def usable(*tensors: torch.Tensor):
    """The ops if the fast path applies to these operands (CPU, float32/float64), else ``None``."""
    for t in tensors:  # a plain loop: this runs on every csr product
        if t.device.type != "cpu" or t.dtype not in KERNEL_DTYPES:
            return None
    return ops()


def describe() -> str:
    """One line: which csr path this process uses, and why (builds the kernel if needed)."""
    try:
        chosen = policy()
        found = ops()
    except KernelUnavailable as exc:
        return f"unavailable: {exc}"
    if found is not None:
        return f"fast C++ kernel ({_vector_flags()[0]}; {ENV}=torch for torch.sparse)"
    if chosen == "torch":
        return f"torch.sparse ({ENV}=torch)"
    return f"torch.sparse (the fast kernel did not build: {_state['reason']})"
