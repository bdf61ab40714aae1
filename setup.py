"""Build script: the Python package plus the optional compiled extension (csrc/).

The compiled part is optional by design: if it is skipped (APA_FAST_NO_EXT=1) or fails to build,
the package still installs and every op runs on its pure-PyTorch path; `python -m apa_fast.info` says why.
"""

from setuptools import find_packages, setup

# kernels/ (Triton device code) is installed as apa_fast.kernels: a top-level package named
# `kernels` would shadow Hugging Face's `kernels` package.
PACKAGES = find_packages(include=["apa_fast", "apa_fast.*"]) + ["apa_fast.kernels"]
PACKAGE_DIR = {"apa_fast": "apa_fast", "apa_fast.kernels": "kernels"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
