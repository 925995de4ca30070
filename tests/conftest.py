import os
import sys

# XLA flags for the test run; they must be set before JAX initializes its
# backends, and a flag already in XLA_FLAGS is left as it is.
#
# * Eight host devices, so that the sharding tests can build a 2 × 4 mesh on a
#   CPU-only machine; tests that do not shard run on the first device as usual.
# * Cheap CPU code generation. The tests run tiny problems, so nearly all of
#   their time is XLA compiling (on one kl_shampoo update, 2.7 s of 3.8 s);
#   LLVM at -O0 with XLA's classic elemental emitters compiles the same
#   programs about three times faster. What the tests assert does not depend on
#   it: every comparison is between programs compiled with the same flags, or
#   against a float64 NumPy reference with a tolerance. Set
#   KL_OPTAX_TEST_XLA_DEFAULTS=1 to test with XLA's default code generation.
#   jaxlib 0.11 and newer no longer know the emitter flag (XLA aborts on an
#   unknown flag), so it is set for older ones only.
def _jaxlib_before(major: int, minor: int) -> bool:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    version = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return False
  return version < (major, minor)


_FLAGS = {"xla_force_host_platform_device_count": "8"}
if not os.environ.get("KL_OPTAX_TEST_XLA_DEFAULTS"):
  _FLAGS["xla_backend_optimization_level"] = "0"
  if _jaxlib_before(0, 11):
    _FLAGS["xla_cpu_use_fusion_emitters"] = "false"
_xla_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _FLAGS.items():
  if _name not in _xla_flags:
    _xla_flags = f"{_xla_flags} --{_name}={_value}".strip()
os.environ["XLA_FLAGS"] = _xla_flags

# The reference implementations live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))


# The files with the longest tests run first: under pytest-xdist the run then
# ends on short tests, instead of one worker finishing a long one while the
# others wait. (The order within a file is kept.)
_LONG_FIRST = ("tests/test_examples.py", "tests/test_properties.py", "tests/test_cpu_lapack.py",
               "tests/test_layout.py", "tests/test_sharding.py", "tests/test_dims.py",
               "tests/test_grad.py")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)

  items.sort(key=rank)
