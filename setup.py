"""The one C extension: bit-plane split and merge (zipmoe_ray/codec/_planes.c). Everything else about the
package is in pyproject.toml. Optional: without a C compiler the package installs and uses numpy for the
same bit moves (zipmoe_ray.codec.planes.IMPLEMENTATION says which is in use)."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "zipmoe_ray.codec._planes",
            ["zipmoe_ray/codec/_planes.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ]
)
