import os
import sys

# Eight host devices, so that the sharding tests can build a 2 × 4 mesh on a
# CPU-only machine. Must be set before JAX initializes its backends; tests
# that do not shard run on the first device as usual.
_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The reference implementations live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
