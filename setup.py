"""Only the optional C accelerator; everything else is in pyproject.toml.

`optional=True`: on a machine without a C compiler the build goes on without it and
spikevaediff.core.wire uses its pure-Python decode (same results, slower).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("spikevaediff.core._wirefast", ["core/_wirefast.c"], optional=True)])
