"""Build hook: the published conformance vectors ship inside the package.

The repository keeps one reviewable copy of the suite, ``conformance/``
(``refattn export --check`` keeps it current). Building a wheel (``pip
install .``) copies it into the package as ``refattn/conformance/vectors/``,
where :func:`refattn.conformance.verify.default_suite_folder` finds it from
any working directory. Everything else is configured in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SUITE = Path(__file__).resolve().parent / "conformance"
#: Where the suite goes inside the built package (refattn.conformance.verify.PACKAGED_SUITE).
PACKAGED = ("refattn", "conformance", "vectors")
#: The files of a suite: its manifest, its description and its case files.
SUITE_FILES = ("manifest.json", "README.md", "*/*.safetensors")


class build_py_with_vectors(build_py):
    """``build_py``, then a copy of ``conformance/`` into the built package."""

    def run(self):
        super().run()
        target = Path(self.build_lib).joinpath(*PACKAGED)
        for pattern in SUITE_FILES:
            for source in sorted(SUITE.glob(pattern)):
                destination = target / source.relative_to(SUITE)
                self.mkpath(str(destination.parent))
                self.copy_file(str(source), str(destination))


setup(cmdclass={"build_py": build_py_with_vectors})
