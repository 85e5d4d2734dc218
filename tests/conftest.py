"""Test-wide setup, before JAX is imported anywhere: four fake CPU devices for the sharding tests, XLA's CPU backend
at its lowest optimisation level, and no persistent compilation cache. The tests run toy models whose cost is almost
all compilation; skipping LLVM's expensive passes halves the suite's time and changes no result beyond float
rounding."""
import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `teco-ssm` child processes keep out of the user's cache directory (tests/test_compile_cache.py tests the cache)
os.environ.setdefault("TECO_SSM_COMPILATION_CACHE", "off")
