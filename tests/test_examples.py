"""The example and the benchmark script run end to end (at a tiny size)."""

import ast
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import kl_optax

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


def test_shakespeare_example_runs_scanned(tmp_path, capsys):
  example = _load(os.path.join(ROOT, "examples", "shakespeare_char.py"))
  args = ["--steps", "6", "--batch", "4", "--context", "16", "--d-model", "16",
          "--layers", "2", "--val-batches", "2", "--plot", ""]
  runs = example.main(args + ["--scan"])
  # 6 matrices per layer, held in 6 stacked leaves (the unrolled model holds 12).
  assert "preconditions 12 weight matrices in 6 leaves" in capsys.readouterr().out
  for r in runs.values():
    assert np.all(np.isfinite(r["train"])) and r["train"][-1] < r["train"][0]


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
    adamw = summary["adamw"]
    assert adamw["step_ms"] > 0
    for s in summary.values():
      # Ratios are to AdamW's time measured in the same process.
      assert s["step_ms_vs_adamw"] == pytest.approx(s["step_ms"] / adamw["step_ms"])
      # The target is AdamW's final loss; the steps to it are interpolated on each optimizer's
      # own mean validation curve, within the run, or None when it is not reached.
      assert s["target"] == adamw["final_val"]
      reached = s["steps_to_target"]
      assert reached is None or 1 <= reached <= 8, reached
      assert reached == suite.steps_to_target(s["curve_steps"], s["curve_val"], s["target"])
      # The time to it is the measured cumulative train-step time at the same crossing; the
      # median-based estimate is kept beside it.
      assert s["seconds_to_target"] == suite.steps_to_target(s["curve_seconds"], s["curve_val"],
                                                             s["target"])
      assert (s["seconds_to_target"] is None) == (reached is None)
      assert s["p95_step_ms"] >= s["step_ms"] * 0.5 > 0
    assert summary["adamw"]["refresh_period"] is None and summary["adamw"]["refresh_ratio"] is None
    assert summary["kl_shampoo"]["refresh_period"] == 10
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
  out = capsys.readouterr().out
  assert "Summary" in out and "target: AdamW's final validation loss" in out
  assert "goal" not in out and "—×" not in out


def test_step_statistics_separate_refresh_steps():
  from kl_optax.benchmarks import suite
  # Steps 0 (initialization), 10 and 20 are refresh steps of a period-10 optimizer.
  times = [5.0] + [0.01] * 9 + [0.05] + [0.01] * 9 + [0.07] + [0.02] * 9
  s = suite.step_statistics(times, period=10)
  assert s["refresh_ms"] == pytest.approx(60.0) and s["ordinary_ms"] == pytest.approx(10.0)
  assert s["refresh_ratio"] == pytest.approx(6.0)
  assert s["median_ms"] == pytest.approx(10.0)
  assert s["p95_ms"] == pytest.approx(1e3 * np.percentile(times[1:], 95))
  assert suite.step_statistics(times, period=None)["refresh_ratio"] is None


def test_quick_preset_checks_its_arguments_before_writing(tmp_path):
  from kl_optax.benchmarks import suite
  out = tmp_path / "never"
  with pytest.raises(SystemExit, match="no tuned learning rate"):
    suite.main(["--workloads", "digits_cnn", "--optimizers", "adamw", "--out", str(out)])
  assert not out.exists()


def test_quick_preset_runs_a_variant_at_its_recipes_tuned_rate(tmp_path):
  from kl_optax.benchmarks import suite
  report = suite.main(["--workloads", "digits_mlp", "--optimizers", "adamw,kl_shampoo@spike_threshold=None",
                       "--steps", "2", "--evals", "1", "--timing-calls", "1",
                       "--out", str(tmp_path), "--no-progress"])
  summary = report["workloads"]["digits_mlp"]["summary"]
  rate = suite.QUICK_LEARNING_RATES["digits_mlp"]["kl_shampoo"]
  assert summary["kl_shampoo@spike_threshold=None"]["best_lr"] == rate


def test_steps_to_target_interpolates_the_first_crossing():
  from kl_optax.benchmarks import suite
  steps, losses = [2, 4, 6, 8], [2.0, 1.5, 1.0, 0.5]
  # Between the evaluations at steps 4 (1.5) and 6 (1.0): a quarter of the way from 4 to 6.
  assert suite.steps_to_target(steps, losses, 1.375) == pytest.approx(4.5)
  assert suite.steps_to_target(steps, losses, 1.0) == 6.0  # met exactly at an evaluation
  assert suite.steps_to_target(steps, losses, 3.0) == 2.0  # already below at the first one
  assert suite.steps_to_target(steps, losses, 0.4) is None  # never reached
  # The first crossing counts, not a later one after the loss rose again.
  assert suite.steps_to_target([1, 2, 3, 4], [2.0, 1.0, 3.0, 0.0], 1.5) == pytest.approx(1.5)
  # A curve that becomes non-finite before the target never reaches it.
  assert suite.steps_to_target(steps, [2.0, float("nan"), 0.5, 0.1], 1.0) is None


def _imports(path):
  """``(module, names)`` for every import of a file: ``import a.b`` is ``("a.b", ())``,
  ``from a import b, c`` is ``("a", ("b", "c"))``."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, ()) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      found.append(("." * node.level + (node.module or ""), tuple(a.name for a in node.names)))
  return found


EXAMPLES = sorted(n for n in os.listdir(os.path.join(ROOT, "examples")) if n.endswith(".py"))
# What an example may import besides the standard library: the public kl_optax API, the data
# sets and models meant for examples, and the libraries it trains and plots with.
EXAMPLE_MODULES = {"kl_optax", "kl_optax.datasets", "kl_optax.models"}
EXAMPLE_LIBRARIES = {"flax", "optax", "jax", "numpy", "tqdm", "matplotlib"}


def _import_problems(path):
  """The imports of ``path`` that an example should not have."""
  problems = []
  imports = _imports(path)
  if not any(module == "kl_optax" for module, _ in imports):
    problems.append("no import kl_optax")
  for module, names in imports:
    top = module.split(".")[0]
    if "benchmarks" in module.split(".") or (module == "kl_optax" and "benchmarks" in names):
      problems.append(f"{module} {names}: the benchmark harness")
    elif top == "kl_optax" and module not in EXAMPLE_MODULES:
      problems.append(f"{module}: a submodule of the core")
    elif module == "kl_optax" and not all(n in kl_optax.__all__ or n in {"datasets", "models"}
                                          for n in names):
      problems.append(f"{module} {names}: not public API")
    elif top != "kl_optax" and top not in EXAMPLE_LIBRARIES and top not in sys.stdlib_module_names:
      problems.append(f"{module}: not a library of the examples")
  return problems


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_imports_nothing_from_the_benchmarks(name):
  assert _import_problems(os.path.join(ROOT, "examples", name)) == []


def test_the_import_check_finds_benchmark_and_core_imports(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("import os\nimport kl_optax\nimport kl_optax.benchmarks.gpt\n"
                  "from kl_optax.benchmarks import harness\nfrom kl_optax import benchmarks\n"
                  "from kl_optax.compose import kron_transform\nimport pandas\n"
                  "from kl_optax.models import GPT\nfrom kl_optax import exclude, datasets\n")
  assert _import_problems(str(path)) == [
      "kl_optax.benchmarks.gpt (): the benchmark harness",
      "kl_optax.benchmarks ('harness',): the benchmark harness",
      "kl_optax ('benchmarks',): the benchmark harness",
      "kl_optax.compose: a submodule of the core",
      "pandas: not a library of the examples",
  ]


def test_suite_quick_preset_has_every_learning_rate():
  from kl_optax.benchmarks import suite, tasks
  quick = suite.PRESETS["quick"]
  for workload in quick.workloads:
    assert workload in tasks.TASKS
    assert set(suite.QUICK_LEARNING_RATES[workload]) >= set(quick.optimizers_for(workload))
  # The first command of the Quickstart shows every recipe and both peers.
  shown = {n for w in quick.workloads for n in quick.optimizers_for(w)}
  assert shown == {"adamw", "muon", *kl_optax.RECIPES}


def test_suite_extends_the_grid_beyond_an_edge_optimum():
  from kl_optax.benchmarks import harness
  assert harness.extend_grid([1.0, 2.0, 4.0], 0) == 0.5
  assert harness.extend_grid([1.0, 2.0, 4.0], 2) == 8.0
  assert harness.extend_grid([1.0, 2.0, 4.0], 1) is None
  assert harness.extend_grid([1.0], 0) is None
  assert harness.parse_variant("kl_shampoo@init_factor=1e-3@rank=8") == (
      "kl_shampoo", {"init_factor": 1e-3, "rank": 8})
  assert harness.parse_variant("kl_shampoo@init_factor=rms@max_clamp=None@normalize_update=True") == (
      "kl_shampoo", {"init_factor": "rms", "max_clamp": None, "normalize_update": True})


def test_sweep_extends_past_an_edge_and_skips_diverged_runs():
  from kl_optax.benchmarks.horizon import sweep
  calls = []

  def loss(lr):  # minimum at lr = 8; lr = 32 diverges
    calls.append(lr)
    return float("nan") if lr >= 32 else (np.log2(lr) - 3.0) ** 2
  best, losses = sweep(loss, [1.0, 2.0, 4.0], max_extend=3)
  assert best == 8.0 and calls == [1.0, 2.0, 4.0, 8.0, 16.0]
  best, losses = sweep(loss, [8.0, 16.0, 32.0], max_extend=3)
  assert best == 8.0 and sorted(losses) == [4.0, 8.0, 16.0, 32.0]


def test_horizon_benchmark_runs_and_merges(tmp_path):
  from kl_optax.benchmarks import horizon
  tiny = ["--layers", "1", "--heads", "2", "--context", "8", "--batch", "2", "--val-batches", "1",
          "--max-extend", "0"]
  report = horizon.main([*tiny, "--d-model", "8", "--steps", "4", "--sweep-steps", "2",
                         "--seeds", "2", "--evals", "2", "--optimizers", "adamw,muon",
                         "--out", str(tmp_path / "h")])
  assert set(report["optimizers"]) == {"adamw", "muon"}
  assert len(report["optimizers"]["muon"]["long_runs"]) == 2
  assert "Ordering at 4 steps" in (tmp_path / "h" / "results.md").read_text()
  # Runs split over two processes combine into one report, as if run together.
  report2 = horizon.main([*tiny, "--d-model", "8", "--steps", "4", "--sweep-steps", "2",
                          "--seeds", "2", "--evals", "2", "--optimizers", "kl_shampoo",
                          "--out", str(tmp_path / "h2")])
  merged = horizon.merge([str(tmp_path / "h"), str(tmp_path / "h2")], str(tmp_path / "m"))
  assert list(merged["optimizers"]) == ["adamw", "muon", "kl_shampoo"]
  assert merged["optimizers"]["muon"] == report["optimizers"]["muon"]
  text = (tmp_path / "m" / "results.md").read_text()
  assert "| kl_shampoo |" in text and "| adamw |" in text and (tmp_path / "m" / "curves.png").exists()
  # A run made with other settings (here: 3 steps instead of 4) is refused, and so is
  # an optimizer that two directories both hold.
  other = json.loads((tmp_path / "h2" / "runs.json").read_text())
  other["args"]["steps"] = 3
  (tmp_path / "h3").mkdir()
  (tmp_path / "h3" / "runs.json").write_text(json.dumps(other))
  with pytest.raises(SystemExit, match="other settings"):
    horizon.merge([str(tmp_path / "h"), str(tmp_path / "h3")], str(tmp_path / "m2"))
  with pytest.raises(SystemExit, match="repeats"):
    horizon.merge([str(tmp_path / "h"), str(tmp_path / "h2"), str(tmp_path / "h2")],
                  str(tmp_path / "m3"))
  # The seeds of one optimizer can run in separate processes without a second sweep:
  # seed 1 alone reproduces seed 1 of the run above, and a third seed merges into it.
  lr = report2["optimizers"]["kl_shampoo"]["learning_rate"]
  fixed = [*tiny, "--d-model", "8", "--steps", "4", "--sweep-steps", "2", "--seeds", "1",
           "--evals", "2", "--optimizers", "kl_shampoo", "--learning-rate", str(lr)]
  alone = horizon.main([*fixed, "--first-seed", "1", "--out", str(tmp_path / "s1")])
  entry = alone["optimizers"]["kl_shampoo"]
  assert entry["seeds"] == [1] and entry["sweep"] == {} and entry["short"] is None
  np.testing.assert_array_equal(entry["long_runs"][0]["val_loss"],
                                report2["optimizers"]["kl_shampoo"]["long_runs"][1]["val_loss"])
  horizon.main([*fixed, "--first-seed", "2", "--out", str(tmp_path / "s2")])
  merged = horizon.merge([str(tmp_path / "h2"), str(tmp_path / "s2")], str(tmp_path / "m4"))
  combined = merged["optimizers"]["kl_shampoo"]
  assert combined["seeds"] == [0, 1, 2] and len(combined["long_runs"]) == 3
  assert combined["sweep"] == report2["optimizers"]["kl_shampoo"]["sweep"]
  np.testing.assert_allclose(
      combined["long_mean"], np.mean([r["val_loss"][-1] for r in combined["long_runs"]]))
  assert "(seeds 0/1/2)" in (tmp_path / "m4" / "results.md").read_text()
  with pytest.raises(SystemExit, match="repeats"):  # seed 1 twice
    horizon.merge([str(tmp_path / "h2"), str(tmp_path / "s1")], str(tmp_path / "m5"))
  with pytest.raises(SystemExit, match="--learning-rate must be positive"):
    horizon.main([*fixed, "--learning-rate", "0", "--out", str(tmp_path / "bad")])


def test_width_benchmark_runs(tmp_path):
  from kl_optax.benchmarks import width
  tiny = ["--layers", "1", "--heads", "2", "--context", "8", "--batch", "2", "--val-batches", "1",
          "--max-extend", "0"]
  results = width.main([*tiny, "--widths", "8,16", "--steps", "2", "--evals", "1",
                        "--optimizers", "kl_shampoo@init_factor=rms",
                        "--out", str(tmp_path / "w")])
  assert set(results["kl_shampoo@init_factor=rms"]) == {8, 16}
  assert (tmp_path / "w" / "width.png").exists()
  # Two seeds: each learning rate keeps both losses, and their mean picks the best.
  two = width.main([*tiny, "--widths", "8", "--steps", "2", "--evals", "1", "--seeds", "2",
                    "--optimizers", "adamw", "--out", str(tmp_path / "w2")])["adamw"][8]
  assert set(two["seeds"]) == set(two["sweep"])
  for lr, losses in two["seeds"].items():
    assert len(losses) == 2 and losses[0] != losses[1]
    assert two["sweep"][lr] == pytest.approx(np.mean(losses))
  assert two["loss"] == min(two["sweep"].values())
  with pytest.raises(SystemExit, match="--seeds must be at least 1"):
    width.main([*tiny, "--seeds", "0", "--out", str(tmp_path / "w0")])


def test_every_task_builds_and_has_a_finite_loss():
  import jax
  from kl_optax.benchmarks import tasks
  for name in tasks.TASKS:
    task = tasks.make_task(name, "tiny", seed=0)
    x, y = task.batches(0)
    loss = jax.jit(task.setup.loss)(task.setup.params, task.setup.rest, x, y)
    assert np.isfinite(float(loss)), name
    # The same seed gives the same batch; training batches differ from step to step.
    np.testing.assert_array_equal(task.batches(3)[1], task.batches(3)[1])
  with np.testing.assert_raises(ValueError):
    tasks.make_task("imagenet")


def test_eager_update_benchmark_runs(tmp_path):
  from kl_optax.benchmarks import eager_update
  rows = eager_update.main(["--optimizers", "kl_shampoo", "--calls", "2", "--shape", "8x4",
                            "--out", str(tmp_path)])
  assert [r["name"] for r in rows] == ["adamw", "kl_shampoo"]   # AdamW first: the ratios' base
  for r in rows:
    assert r["first_s"] > 0 and r["eager_ms"] > 0 and r["jit_ms"] > 0
    assert r["eager_vs_adamw"] == pytest.approx(r["eager_ms"] / rows[0]["eager_ms"])
    assert r["max_abs_diff"] <= 1e-6, r   # the un-jitted updates equal the jitted ones
  with open(tmp_path / "results.json") as f:
    assert [r["name"] for r in json.load(f)["rows"]] == ["adamw", "kl_shampoo"]
  assert "kl_shampoo" in (tmp_path / "results.md").read_text()


def test_scanned_benchmark_runs(tmp_path):
  from kl_optax.benchmarks import scanned
  rows = scanned.main(["--layers", "2", "--d-model", "16", "--context", "8", "--batch", "2",
                       "--steps", "2", "--rounds", "1", "--out", str(tmp_path)])
  assert [r["config"] for r in rows] == list(scanned.CONFIGS)
  base = next(r for r in rows if r["config"] == "adamw/scanned")
  assert base["compile_vs_scanned_adamw"] == pytest.approx(1.0)
  for r in rows:
    assert r["compile_s"] > 0 and r["lower_s"] > 0 and r["median_ms"] > 0
  assert "kl_shampoo/scanned" in (tmp_path / "results.md").read_text()


def test_benchmarks_pin_the_lapack_kernels_unless_set():
  """OpenBLAS's thread count and kernel choice change eigh/QR bits (docs/benchmarks.md)."""
  import subprocess
  import sys
  code = ("import os, kl_optax.benchmarks; "
          "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ.get('OPENBLAS_CORETYPE'))")
  env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out[0] == "1"
  env["OPENBLAS_NUM_THREADS"] = "3"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out[0] == "3"


def test_precision_benchmark_runs(tmp_path):
  from kl_optax.benchmarks import precision
  rows = precision.main(["--optimizers", "kl_shampoo,soap", "--steps", "6", "--gpt-steps", "0",
                         "--out", str(tmp_path)])
  assert [r["optimizer"] for r in rows] == ["kl_shampoo", "soap"]
  for r in rows:
    # bfloat16 operands move the trajectory, a little; the bases stay orthonormal.
    assert 0 < r["deviation_final"] <= r["deviation_max"] < 0.5
    assert r["orthogonality_float32"] < 1e-4 and r["orthogonality_bfloat16"] < 1e-4
    assert np.isfinite(r["val_float32"]) and np.isfinite(r["val_bfloat16"])
  assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
  # TF32 is the other cheaper setting; XLA's CPU backend ignores it, so here the two runs agree.
  rows = precision.main(["--optimizers", "kl_shampoo", "--steps", "4", "--gpt-steps", "0",
                         "--low", "high", "--out", str(tmp_path / "high")])
  assert rows[0]["deviation_max"] == 0.0 and rows[0]["val_high"] == rows[0]["val_float32"]


def test_gpu_benchmark_runs_on_a_tiny_model(tmp_path):
  from kl_optax.benchmarks import gpu
  rows = gpu.main(["--d-model", "16", "--layers", "2", "--heads", "2", "--context", "8",
                   "--vocab", "32", "--batch", "2", "--steps", "12",
                   "--optimizers", "adamw,kl_shampoo", "--compute", "float32,high,bfloat16",
                   "--out", str(tmp_path)])
  assert [(r["optimizer"], r["compute"]) for r in rows] == [
      ("adamw", "float32"), ("kl_shampoo", "float32"), ("kl_shampoo", "high"),
      ("kl_shampoo", "bfloat16")]
  for r in rows:
    assert r["compile_s"] > 0 and r["ordinary_ms"] > 0 and r["ordinary_p95_ms"] >= r["ordinary_ms"]
    assert np.isfinite(r["final_loss"]) and r["state_bytes"] > 0
    assert r["step_flops"] > 0 and r["step_bytes"] > 0 and len(r["step_seconds"]) == 12
  # The Kronecker update adds FLOPs to the train step (XLA's own count).
  assert rows[1]["step_flops"] > rows[0]["step_flops"]
  assert rows[0]["refresh_ms"] is None                  # AdamW has no refresh steps
  assert rows[1]["refresh_ms"] > 0                      # step 10 refreshed
  assert "| kl_shampoo | bfloat16 |" in (tmp_path / "results.md").read_text()
  # A spent time budget starts no run, and the table says which were not run.
  rows = gpu.main(["--d-model", "16", "--layers", "2", "--heads", "2", "--context", "8",
                   "--vocab", "32", "--batch", "2", "--steps", "12", "--budget-minutes", "0",
                   "--optimizers", "adamw,soap", "--compute", "bfloat16",
                   "--out", str(tmp_path / "none")])
  assert rows == []
  text = (tmp_path / "none" / "results.md").read_text()
  assert "| adamw | float32 | not run" in text and "| soap | bfloat16 | not run" in text
  with pytest.raises(SystemExit, match="unknown setting 'fp8'"):
    gpu.main(["--compute", "fp8", "--out", str(tmp_path / "bad")])
  # Refresh steps are counted apart from the ordinary ones; the first two steps are left out.
  times = gpu.step_times([9.0, 5.0] + [1.0] * 8 + [4.0, 1.0], period=10)
  assert times["ordinary_ms"] == 1e3 and times["refresh_ms"] == 4e3


def test_cost_model_runs_on_a_tiny_model(tmp_path):
  from kl_optax.benchmarks import cost, flops
  rows = cost.main(["--models", "tiny", "--recipes", "adamw,kl_shampoo",
                    "--compute", "float32,bfloat16", "--out", str(tmp_path)])
  assert [(r["recipe"], r["compute"]) for r in rows] == [
      ("adamw", "float32"), ("kl_shampoo", "float32"), ("kl_shampoo", "bfloat16")]
  model = cost.MODELS["tiny"]
  kl = rows[1]
  # XLA's count of the matrices' ordinary updates is the analytic one (within elementwise work).
  analytic = sum(n * flops.ordinary("kl_shampoo", s) for s, n in model.matrices().items())
  ordinary = sum(n * cost.update_cost("kl_shampoo", s)["ordinary_flops"]
                 for s, n in model.matrices().items())
  assert analytic <= ordinary <= 1.3 * analytic
  # A projection: the fraction is the roofline time over fwd+bwd at the bf16 peak.
  peak = cost.ACCELERATORS["H100 SXM"]
  t = max(kl["flops"] / peak["float32"], kl["bytes"] / peak["bandwidth"])
  assert kl["fraction_524288"] == pytest.approx(
      t / (cost.model_flops(model, 524288) / peak["bfloat16"]))
  bf16 = rows[2]   # the same roofline at the bfloat16 peak
  t = max(bf16["flops"] / peak["bfloat16"], bf16["bytes"] / peak["bandwidth"])
  assert bf16["update_ms"] == pytest.approx(1e3 * t)
  assert kl["state_bytes"] > rows[0]["state_bytes"]
  assert (tmp_path / "cost.png").exists() and "projection" in (tmp_path / "results.md").read_text().lower()


def test_gpu_benchmark_script_parses_and_explains_itself(tmp_path):
  import subprocess
  script = os.path.join(ROOT, "examples", "gpu_benchmark.sh")
  assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
  out = subprocess.run(["bash", script], capture_output=True, text=True, check=False)
  assert out.returncode == 2 and "prepare | run | installed" in out.stderr
  # `installed` runs the benchmark with the Python at hand (here: on CPU, a tiny model).
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  out = subprocess.run(["bash", script, "installed", "--d-model", "16", "--layers", "1",
                        "--heads", "2", "--context", "8", "--vocab", "32", "--batch", "2",
                        "--steps", "3", "--optimizers", "adamw", "--out", str(tmp_path)],
                       capture_output=True, text=True, check=False, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| adamw | float32 |" in (tmp_path / "results.md").read_text()


def test_port_benchmark_runs_with_a_stand_in_port(tmp_path, monkeypatch):
  """The port is not a dependency: a missing one is named with its install command, and
  the benchmark's machinery runs against a stand-in with kl_optax's own paper settings."""
  import sys
  import types

  from kl_optax.benchmarks import port
  monkeypatch.setitem(sys.modules, "kl_shampoo_jax", None)   # import fails
  with pytest.raises(SystemExit, match="pip install git"):
    port.main(["--widths", "8", "--out", str(tmp_path / "none")])
  stand_in = types.ModuleType("kl_shampoo_jax")
  stand_in.kl_shampoo_with_adamw = lambda schedule, weight_decay, kl_kwargs: kl_optax.kl_shampoo(
      schedule, weight_decay=weight_decay, init_factor=kl_kwargs["init_factor"],
      spike_threshold=None)
  monkeypatch.setitem(sys.modules, "kl_shampoo_jax", stand_in)
  with pytest.raises(SystemExit, match="--steps must be at least 21"):
    port.main(["--widths", "8", "--steps", "12", "--out", str(tmp_path / "short")])
  report = port.main(["--widths", "8", "--layers", "1", "--heads", "2", "--context", "8",
                      "--batch", "2", "--steps", "21", "--compile-repeats", "1",
                      "--out", str(tmp_path / "p")])
  for d in (8,):
    out = report["widths"][d]
    assert out["max_loss_gap"] == 0.0   # the stand-in is the same program
    rows = {r["optimizer"]: r for r in out["rows"]}
    assert list(rows) == ["adamw", "kl_optax", "kl_optax (port's settings)", "port"]
    assert rows["adamw"]["refresh_ms"] is None and rows["port"]["refresh_ms"] > 0
    assert all(r["compile_s"] > 0 and r["ordinary_ms"] > 0 and len(r["loss"]) == 21
               for r in rows.values())
    assert rows["kl_optax (port's settings)"]["state_bytes"] == rows["port"]["state_bytes"]
  text = (tmp_path / "p" / "results.md").read_text()
  assert "d_model 8" in text and "| port |" in text and "refresh / ordinary" in text
  assert "optimizer state donated" in text
  # Without donated buffers, and with every update after the whole backward
  # pass: the same training. XLA may round the two programs' products
  # differently in the last bit. This model's factors are rank deficient (a
  # one-gradient 32 x 32 factor of an 8 x 32 matrix has rank 8), so their
  # eigenbases are arbitrary on the null spaces and LAPACK's choice there follows
  # those bits; at the defaults the run amplifies that to a relative 3e-5 after
  # 21 steps (seen on an AMD EPYC CPU), at the port's settings it stays below 1e-6.
  again = port.main(["--widths", "8", "--layers", "1", "--heads", "2", "--context", "8",
                     "--batch", "2", "--steps", "21", "--compile-repeats", "1", "--no-donate",
                     "--join-gradients", "--out", str(tmp_path / "q")])
  for a, b in zip(report["widths"][8]["rows"], again["widths"][8]["rows"]):
    assert a["optimizer"] == b["optimizer"]
    rtol = 1e-4 if a["optimizer"] == "kl_optax" else 1e-5
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=rtol, err_msg=a["optimizer"])
  header = (tmp_path / "q" / "results.md").read_text()
  assert "optimizer state not donated; every update starts after the whole backward pass" in header


def test_scale_out_benchmark_runs_with_variants(tmp_path):
  from kl_optax.benchmarks import scale_out
  report = scale_out.main([
      "--optimizers", "adamw,kl_shampoo,kl_shampoo@spike_threshold=None,kl_shampoo_b8",
      "--depths", "1", "--d-model", "16", "--context", "8", "--batch", "4",
      "--memory-d-model", "16", "--memory-layers", "1", "--devices", "1,2",
      "--step-layers", "1", "--model-parallel", "2", "--steps", "11",
      "--out", str(tmp_path / "so")])
  names = ["adamw", "kl_shampoo", "kl_shampoo@spike_threshold=None", "kl_shampoo_b8"]
  assert set(report["steps"]) == set(names)
  for name in names:
    assert report["steps"][name]["median_ms"] > 0
  # The recipes run with their defaults: the spike guard keeps state unless turned off,
  # and 8-blocks hold more, smaller factors than whole 16×16 matrices.
  mem = lambda name, n: report["memory"][f"{name}@{n}"]["total_bytes"]
  assert mem("kl_shampoo", 1) > mem("kl_shampoo@spike_threshold=None", 1)
  assert mem("kl_shampoo_b8", 1) != mem("kl_shampoo", 1)
  assert mem("kl_shampoo", 2) == mem("kl_shampoo", 1)
  md = (tmp_path / "so" / "results.md").read_text()
  assert "| kl_shampoo@spike_threshold=None L1 |" in md  # variant names survive the tables
  assert "| kl_shampoo@spike_threshold=None | 2 |" in md
