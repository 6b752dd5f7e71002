import os

# Tests run on the CPU, in float32 unless a test asks for float64 explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# Command-line runs inside the tests do not write the user's persistent compilation cache (tests that check the
# cache give their own folder).
os.environ.setdefault("DELIB_COMPILATION_CACHE", "off")
