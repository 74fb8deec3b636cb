"""Training throughput and pipeline overhead of the batch-norm MNIST lab, in one run.

    python -m benchmarks.bench_train [--out benchmarks/results.json] [--steps N] [--no-pipeline]

Runs every part of bench_step (step rates: baseline, project, stacked, threads, fastpath)
and of bench_stage (the train stage's overhead, `dvc repro` of the lab), each in its own
child process, so each has its own peak RSS; prints the table and writes every figure to --out.
See benchmarks/README.md for what each figure means and the targets.
"""

from benchmarks import bench_stage, bench_step
from benchmarks.common import ROOT, main, write

PARTS = bench_step.PARTS | bench_stage.PARTS


def summary(results: dict) -> dict:
    base, proj, stack = results.get("baseline", {}), results.get("project", {}), results.get("stacked", {})
    over, pipe, fast = results.get("overhead", {}), results.get("pipeline", {}), results.get("fastpath", {})
    figures = {
        "baseline_steps_per_s": base.get("steps_per_s"),
        "project_steps_per_s": proj.get("steps_per_s"),
        "project_vs_baseline": (proj["steps_per_s"] / base["steps_per_s"]
                                if "steps_per_s" in proj and "steps_per_s" in base else None),
        "stacked_replica_steps_per_s": stack.get("stacked_replica_steps_per_s"),
        "sequential_replica_steps_per_s": stack.get("sequential_replica_steps_per_s"),
        "stacked_vs_sequential": stack.get("ratio"),
        **{f"{path}_steps_per_s_{k}": fast.get(k, {}).get(f"{path}_median_steps_per_s")
           for k in ("k1", "k5") for path in ("private", "public")},
        "private_vs_public_k5": fast.get("k5", {}).get("private_vs_public"),
        "full_lab_repro_s": repro_s(pipe, "full"),
        "one_seed_lab_repro_s": repro_s(pipe, "one_seed"),
        "noop_repro_s": repro_s(pipe, "noop"),
        "overhead_fraction": over.get("overhead_fraction"),
        "per_epoch_logging_checkpoint_fraction": over.get("per_epoch_logging_checkpoint_fraction"),
        "project_ms_per_step_k1": proj.get("ms_per_step"),
        "stacked_ms_per_step_k5": stack.get("stacked_ms_per_step"),
        "peak_rss_mb": {name: part.get("peak_rss_largest_stage_mb", part.get("peak_rss_mb"))
                        for name, part in results.items() if name in PARTS},
    }
    at_least = {"project_vs_baseline": 3.0, "stacked_vs_sequential": 2.5}
    at_most = {"overhead_fraction": 0.05, "per_epoch_logging_checkpoint_fraction": 0.05,
               "full_lab_repro_s": 60.0, "one_seed_lab_repro_s": 30.0, "noop_repro_s": 3.0}
    figures["targets_met"] = {
        **{k: figures[k] is not None and figures[k] >= v for k, v in at_least.items()},
        **{k: figures[k] is not None and figures[k] <= v for k, v in at_most.items()},
    }
    return figures


def repro_s(pipe: dict, name: str) -> float | None:
    """A `dvc repro` wall time, or None where it failed (its log tail is in the JSON)."""
    run = pipe.get(name, {})
    return run.get("wall_s") if run.get("returncode") == 0 else None


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict, figures: dict) -> None:
    base, proj, stack = results.get("baseline", {}), results.get("project", {}), results.get("stacked", {})
    thr, over, pipe = results.get("threads", {}), results.get("overhead", {}), results.get("pipeline", {})
    fast = results.get("fastpath", {})
    rows = [
        ("(a) baseline: torchvision+DataLoader, K=1", fmt(base.get("steps_per_s")) + " steps/s",
         fmt(base.get("ms_per_step"), ".3f") + " ms/step", fmt(base.get("peak_rss_mb"), ".0f")),
        ("(b) project train_epoch, K=1", fmt(proj.get("steps_per_s")) + " steps/s",
         fmt(proj.get("ms_per_step"), ".3f") + " ms/step", fmt(proj.get("peak_rss_mb"), ".0f")),
        ("    ratio (b)/(a)  [target >= 3]", fmt(figures["project_vs_baseline"], ".2f") + "x", "", ""),
        ("(c) K=5 stacked", fmt(stack.get("stacked_replica_steps_per_s")) + " replica-steps/s",
         fmt(stack.get("stacked_ms_per_step"), ".3f") + " ms/step", fmt(stack.get("peak_rss_mb"), ".0f")),
        ("    5 x K=1 sequential", fmt(stack.get("sequential_replica_steps_per_s")) + " replica-steps/s", "", ""),
        ("    ratio stacked/sequential  [target >= 2.5]", fmt(figures["stacked_vs_sequential"], ".2f") + "x", "", ""),
        ("evaluation per epoch (train+val), K=1 / K=5",
         f"{fmt(proj.get('eval_s_per_epoch'), '.3f')} / {fmt(stack.get('eval_s_per_epoch'), '.3f')} s", "", ""),
    ]
    for threads in (1, 2):
        t = thr.get(f"threads_{threads}", {})
        rows.append((f"K=5 at {threads} torch thread(s)", fmt(t.get("best_ms_per_step"), ".3f") + " ms/step",
                     "eval " + fmt(t.get("best_eval_s"), ".3f") + " s", fmt(thr.get("peak_rss_mb"), ".0f")))
    for k in ("k1", "k5"):
        f = fast.get(k, {})
        rows.append((f"fastpath K={k[1:]}: private / public calls (medians)",
                     f"{fmt(f.get('private_median_steps_per_s'))} / {fmt(f.get('public_median_steps_per_s'))} steps/s",
                     fmt(f.get("private_vs_public"), ".2f") + "x", fmt(fast.get("peak_rss_mb"), ".0f")))
    rows += [
        ("train stage in-process / its epochs", f"{fmt(over.get('stage_in_process_s'))} / "
         + f"{fmt(over.get('epochs_inside_stage_s'))} s", "", fmt(over.get("peak_rss_mb"), ".0f")),
        ("    overhead vs bare epochs  [target <= 0.05]", fmt(over.get("overhead_fraction"), ".3f"),
         "in-loop " + fmt(over.get("per_epoch_logging_checkpoint_fraction"), ".3f"), ""),
        ("    import pipeline.stages.train", fmt(over.get("import_pipeline_train_s"), ".2f") + " s", "", ""),
        ("dvc repro, full lab, 5 seeds  [target <= 60 s]", fmt(figures["full_lab_repro_s"]) + " s", "",
         fmt(pipe.get("peak_rss_largest_stage_mb"), ".0f")),
        ("dvc repro, full lab, 1 seed  [target <= 30 s]", fmt(figures["one_seed_lab_repro_s"]) + " s", "", ""),
        ("dvc repro, no-op", fmt(figures["noop_repro_s"], ".2f") + " s", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'throughput':>28}  {'':>18}  peak RSS MB")
    for label, a, b, c in rows:
        print(f"{label:{width}}  {a:>28}  {b:>18}  {c:>6}")
    for label, seconds in sorted(over.get("breakdown_s", {}).items(), key=lambda kv: -kv[1]):
        print(f"    {label:70} {seconds:7.2f} s")
    for name in ("full", "noop", "one_seed"):
        for stage_name, seconds in pipe.get(name, {}).get("stages_s", {}).items():
            print(f"    dvc {name}: {stage_name:30} {seconds:7.2f} s")
    for name, part in results.items():
        if "error" in part:
            print(f"!! part {name} failed: {' | '.join(part['error'])}")
    for name in ("full", "noop", "one_seed"):
        if pipe.get(name, {}).get("returncode"):
            print(f"!! dvc repro ({name}) failed: {pipe[name]['log_tail'][-2].strip()}")


if __name__ == "__main__":
    ran = main(__doc__, PARTS, out=ROOT / "benchmarks" / "results.json")
    if ran is not None:
        results, args = ran
        figures = summary(results)
        print_table(results, figures)
        write({"summary": figures, **results}, args.out)
