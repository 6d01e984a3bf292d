"""Builds the Cython data plane in smg/_fast/. There is no pure-Python fallback:
the gateway does not import without its compiled extensions.

The extensions are linked stripped (no symbols, no debug information);
SMG_DEBUG_SYMBOLS=1 keeps them, for gdb."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

LINK_ARGS = [] if os.environ.get("SMG_DEBUG_SYMBOLS") == "1" else ["-s"]

FAST_MODULES = [
    "http1",
    "worker",
    "exchange",
    "upstream",
    "fetch",
    "request",
    "routes",
    "flow",
    "admission",
    "cycle",
    "server",
    "call",
    "routing_text",
    "bodyjson",
    "radix",
    "kvindex",
    "policies",
    "proxy",
    "pd",
    "selector",
]

extensions = [
    Extension(
        f"smg._fast.{name}",
        [f"smg/_fast/{name}.pyx"],
        extra_compile_args=["-O3"],
        extra_link_args=LINK_ARGS,
    )
    for name in FAST_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    ),
)
