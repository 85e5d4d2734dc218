"""Test-wide setup, before JAX is imported anywhere: four fake CPU devices for the sharding tests, and XLA's CPU
backend at its lowest optimisation level. The tests run toy models whose cost is almost all compilation; skipping
LLVM's expensive passes halves the suite's time and changes no result beyond float rounding."""
import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
