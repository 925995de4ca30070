"""The example and the benchmark script run end to end (at a tiny size)."""

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_shakespeare_example_runs(tmp_path, capsys):
  example = _load(os.path.join(ROOT, "examples", "shakespeare_char.py"))
  plot = tmp_path / "curves.png"
  runs = example.main(["--steps", "6", "--batch", "4", "--context", "16", "--d-model", "16",
                       "--layers", "1", "--val-batches", "2", "--plot", str(plot)])
  assert set(runs) == {"adamw", "kl_shampoo"}
  for r in runs.values():
    assert len(r["train"]) == 6 and np.all(np.isfinite(r["train"])) and np.isfinite(r["val"])
  # Both optimizers learn something in six steps from the same start.
  for r in runs.values():
    assert r["train"][-1] < r["train"][0]
  assert plot.exists() and plot.stat().st_size > 0
  out = capsys.readouterr().out
  assert "validation loss" in out and "kl_shampoo" in out


def test_char_gpt_benchmark_runs(tmp_path):
  from kl_optax.benchmarks import char_gpt
  report = char_gpt.main(["--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16",
                          "--batch", "4", "--steps", "8", "--eval-every", "4", "--val-batches", "1",
                          "--lrs", "1e-3,1e-1", "--max-extend", "1", "--timing-calls", "3",
                          "--out", str(tmp_path)])
  for name in ("adamw", "kl_shampoo"):
    s = report["summary"][name]
    assert np.isfinite(s["final_val"]) and s["step_ms"] > 0 and s["update_ms"] > 0
  # The measured state size is the analytic one, up to the int32 step and
  # refresh counters (a few bytes per tensor).
  for name, analytic in report["analytic_state_bytes_per_param"].items():
    measured = report["summary"][name]["state_bytes_per_param"]
    assert analytic <= measured <= analytic * 1.02, (name, measured, analytic)
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["summary"].keys() == report["summary"].keys()
  assert (tmp_path / "results.md").exists() and (tmp_path / "curves.png").exists()


def test_compose_custom_example_runs():
  example = _load(os.path.join(ROOT, "examples", "compose_custom.py"))
  results = example.main(["--steps", "20", "--batch", "4", "--context", "16", "--d-model", "16",
                          "--layers", "1", "--val-batches", "1"])
  assert set(results) == {"kl_shampoo", "custom"}
  for r in results.values():
    assert np.isfinite(r["val"])
  # The fixed refresh ran at t = 10 for every factor; the adaptive one may skip.
  fixed = results["kl_shampoo"]["refreshes"]
  assert fixed and all(count > 0 for counts in fixed.values() for count in counts)
  assert set(results["custom"]["refreshes"]) == set(fixed)


def test_per_mode_part_takes_each_factor_from_its_part():
  import jax.numpy as jnp
  import kl_optax
  example = _load(os.path.join(ROOT, "examples", "compose_custom.py"))
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  state = kl_optax.init_kron_state((3, 5))
  step = kl_optax.TensorStep(state, g, g, jnp.int32(0))
  kl, raw = kl_optax.kl_factor_update(0.9), kl_optax.shampoo_factor_update(0.9)
  mixed = example.per_mode(kl, raw).first_update(step)
  np.testing.assert_array_equal(mixed.state.factors[0], kl.first_update(step).state.factors[0])
  np.testing.assert_array_equal(mixed.state.factors[1], raw.first_update(step).state.factors[1])


def test_pretrain_sharded_example_runs(capsys):
  import jax
  example = _load(os.path.join(ROOT, "examples", "pretrain_sharded.py"))
  result = example.main(["--steps", "4", "--batch", "8", "--context", "16", "--d-model", "16",
                         "--layers", "2", "--val-batches", "1", "--log-every", "2"])
  assert np.all(np.isfinite(result["train"])) and np.isfinite(result["val"])
  assert result["devices"] == jax.device_count()
  if jax.device_count() >= 8:
    # The Kronecker stacks are spread over the devices: each holds a small share.
    assert result["state_bytes_per_device"] < result["state_bytes"] / 4
  assert "fullest device" in capsys.readouterr().out


def test_plain_jax_example_runs(capsys):
  example = _load(os.path.join(ROOT, "examples", "plain_jax.py"))
  result = example.main(["--steps", "40", "--hidden", "32", "--batch", "32", "--log-every", "20"])
  history = result["history"]
  assert [h[0] for h in history] == [20, 40]
  first_val, last_val, last_acc = history[0][2], history[-1][2], history[-1][3]
  # Ten classes: chance is 10% accuracy and a loss of ln 10 ≈ 2.30.
  assert np.isfinite(last_val) and last_val < first_val and last_val < 1.0 and last_acc > 0.7
  # The head went to AdamW, the hidden matrices to the Kronecker branch.
  import kl_optax
  labels = kl_optax.kron_labels(result["params"], precondition_mask=kl_optax.exclude("head"))
  assert labels["head"]["w"] == "adam" and labels["hidden0"]["w"] == "kron"
  assert all(np.all(np.isfinite(x)) for x in jax_leaves(result["opt_state"]))
  assert "routing" in capsys.readouterr().out


def jax_leaves(tree):
  import jax
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]


def test_benchmark_suite_runs(tmp_path, capsys):
  from kl_optax.benchmarks import suite
  report = suite.main(["--preset", "tiny", "--workloads", "digits_cnn,kron_regression",
                       "--optimizers", "adamw,muon,kl_shampoo", "--lrs", "1e-2", "--max-extend", "0",
                       "--steps", "8", "--seeds", "2", "--evals", "4", "--timing-calls", "3",
                       "--out", str(tmp_path), "--no-progress"])
  assert set(report["workloads"]) == {"digits_cnn", "kron_regression"}
  for w in report["workloads"].values():
    summary = w["summary"]
    assert list(summary) == ["adamw", "muon", "kl_shampoo"]
    assert summary["adamw"]["step_ms_vs_adamw"] == 1.0
    # AdamW reaches its own final loss (the target), at the latest at the last step.
    assert summary["adamw"]["steps_to_target"] is not None
    assert summary["adamw"]["steps_to_target"] <= 8
    for s in summary.values():
      assert len(s["final_val_seeds"]) == 2 and all(np.isfinite(s["final_val_seeds"]))
      assert s["curve_steps"] == [2, 4, 6, 8] and len(s["curve_seconds"]) == 4
      assert s["step_ms"] > 0 and s["update_ms"] > 0 and s["compile_s"] > 0
      assert s["peak_mib"] > 0 and s["update_mflops"] > 0
    # The Kronecker state is larger than AdamW's two moments per parameter.
    assert summary["kl_shampoo"]["state_bytes_per_param"] > summary["adamw"]["state_bytes_per_param"]
    # The seeds differ (initialization for the CNN, samples for the regression).
    assert len(set(summary["adamw"]["final_val_seeds"])) == 2
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["workloads"].keys() == report["workloads"].keys()
  md = (tmp_path / "results.md").read_text()
  assert "### digits_cnn" in md and "kl_shampoo" in md
  for name in ("digits_cnn.png", "kron_regression.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert "Summary" in capsys.readouterr().out


def test_suite_quick_preset_has_every_learning_rate():
  from kl_optax.benchmarks import suite, tasks
  quick = suite.PRESETS["quick"]
  for workload in quick.workloads:
    assert workload in tasks.TASKS
    assert set(suite.QUICK_LEARNING_RATES[workload]) >= set(quick.optimizers)


def test_suite_extends_the_grid_beyond_an_edge_optimum():
  from kl_optax.benchmarks import harness
  assert harness.extend_grid([1.0, 2.0, 4.0], 0) == 0.5
  assert harness.extend_grid([1.0, 2.0, 4.0], 2) == 8.0
  assert harness.extend_grid([1.0, 2.0, 4.0], 1) is None
  assert harness.extend_grid([1.0], 0) is None
  assert harness.parse_variant("kl_shampoo@init_factor=1e-3@rank=8") == (
      "kl_shampoo", {"init_factor": 1e-3, "rank": 8})


def test_every_task_builds_and_has_a_finite_loss():
  from kl_optax.benchmarks import tasks
  for name in tasks.TASKS:
    task = tasks.make_task(name, "tiny", seed=0)
    x, y = task.batches(0)
    loss = task.setup.loss(task.setup.params, task.setup.rest, x, y)
    assert np.isfinite(float(loss)), name
    # The same seed gives the same batch; training batches differ from step to step.
    np.testing.assert_array_equal(task.batches(3)[1], task.batches(3)[1])
  with np.testing.assert_raises(ValueError):
    tasks.make_task("imagenet")
