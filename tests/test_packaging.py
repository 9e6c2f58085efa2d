"""The project's `kernels` import package must never pass for the Hugging Face `kernels`
package: transformers reads this distribution's version for that import name."""


def test_transformers_does_not_mistake_our_kernels_package_for_hf_kernels():
    from transformers.utils import is_kernels_available

    import kernels

    assert kernels.__file__  # ours is importable...
    assert not is_kernels_available()  # ...and transformers still sees no HF kernels


def test_kernel_modules_import_without_gpu_extras():
    import importlib

    for name in ("attention", "conv1d", "gated_delta", "norm", "dispatch"):
        importlib.import_module(f"kernels.{name}")
    from kernels.dispatch import select_kernels

    assert select_kernels("cpu").name in ("cpu", "cpu+c")
