"""``aios-ray autotune``: a Ray Tune sweep whose trials train with the same function as ``aios-ray train``,
searched by Optuna (``OptunaSearch``: TPE or random) and pruned by a Tune scheduler on the trial's step.

A trial: the base config (preset + ``--train-args`` + data flags) with the trial's values
(``aios_ray.tune.space``), trained in the trial's process (no nested Ray Train) into its own brain bundle
under the experiment folder; every evaluation is reported to Tune (``TrialContext``), so the scheduler can
stop a poor trial early. A trial that raises (out of memory, a NaN loss, bad data) is recorded as failed
with its reason and the sweep goes on.

The study lives in an Optuna RDB storage (``--storage``, default ``sqlite:///<out>/autotune.db``): the same
``--study-name`` and storage continue it, running only the trials still missing. Outputs in ``--out-dir``:
``autotune_<timestamp>.jsonl`` (one line per trial of this sweep), ``best_trial.json`` (the study's best:
params, metric, a YAML snippet for ``aios-ray train --config``), ``autotune_history.png`` and
``autotune_importance.png`` (Optuna's own plots and importance evaluator).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from ray.tune import Callback

from aios_ray.config import Config, ConfigError
from aios_ray.durable import atomic_write_json
from aios_ray.tracking.jsonl import format_seconds, say
from aios_ray.train.context import LocalContext
from aios_ray.tune.settings import AutotuneConfig
from aios_ray.tune.space import SearchSpace, apply_params, check_config, yaml_snippet

FINISHED = ("COMPLETE", "PRUNED", "FAIL")  # Optuna states of trials a resumed study does not run again


# ---- the trial ------------------------------------------------------------------------------------------


class TrialContext(LocalContext):
    """A Tune trial's process: the loop's reports (at each evaluation) go to Tune, which decides on pruning.
    A non-finite loss ends the trial as failed: nothing more can be learned from it."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray
        from ray import tune

        for key in ("train_loss", "eval_loss"):
            value = metrics.get(key)
            if value is not None and not math.isfinite(float(value)):
                raise FloatingPointError(f"{key} is {value} at step {metrics.get('step')}")
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        tune.report({**numeric, "node_id": ray.get_runtime_context().get_node_id()})


def run_trial(params: dict[str, Any], base: dict[str, Any], bundles: str, threads: int) -> None:
    """One trial: the base config with ``params``, trained in this process, reporting every evaluation."""
    import torch
    from ray import tune

    from aios_ray.train.loop import train_worker
    from aios_ray.train.prepare import prepare_run

    torch.set_num_threads(max(threads, 1))
    sections = apply_params(base, params)
    train = sections["train"]
    # A report per evaluation (the loop reports at checkpoints); one checkpoint kept per trial bundle.
    train.update(brain_name=tune.get_context().get_trial_id(), bundle_dir=bundles, log_file=None,
                 checkpoint_interval=train["eval_interval"], keep_checkpoints=1)
    sections["cluster"]["use_ray"] = False
    plan, data = prepare_run(Config.from_dict(sections, source="autotune trial"))
    with TrialContext(sections["cluster"]["use_gpu"]) as ctx:
        train_worker(plan, data, ctx)


# ---- the sweep ------------------------------------------------------------------------------------------


class Autotune:
    def __init__(self, cfg: AutotuneConfig, space: SearchSpace, base: Config) -> None:
        self.cfg, self.space = cfg, space
        self.base = absolute_paths(base.to_dict())  # trials run in their own working directories
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.study_name = cfg.study_name or f"autotune-{self.stamp}"
        self.out = Path(cfg.out_dir).resolve()
        self.storage_url = cfg.storage or f"sqlite:///{self.out / 'autotune.db'}"
        if not base.train.eval_file and base.train.dataset_file and cfg.metric.startswith("eval"):
            raise ConfigError(f"--metric {cfg.metric} needs held-out text: give --eval-file")
        check_config(base.to_dict())

    def run(self) -> dict[str, Any]:
        storage = open_storage(self.storage_url)  # a bad storage or study is refused before anything is written
        remaining = self._remaining(storage)
        self.out.mkdir(parents=True, exist_ok=True)
        if remaining == 0:
            say(f"autotune: study {self.study_name} already has {self.cfg.trials} finished trials; nothing to run")
            records: list[dict[str, Any]] = []
        else:
            records = self._sweep(storage, remaining)
        return self._report(storage, records)

    def _remaining(self, storage: Any) -> int:
        """Trials still to run: a new study runs them all; an existing one must have the same space and
        direction, and its finished trials count."""
        import optuna

        names = {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
        if self.study_name not in names:
            return self.cfg.trials
        study = optuna.load_study(study_name=self.study_name, storage=storage)
        if study.direction.name.lower() != self.cfg.direction:
            raise ConfigError(f"--study-name {self.study_name}: the stored study goes in direction "
                              f"{study.direction.name.lower()}, not {self.cfg.direction}")
        ours = self.space.distributions()
        for trial in study.trials:
            for name, dist in trial.distributions.items():
                if name not in ours or ours[name] != dist:
                    raise ConfigError(f"--study-name {self.study_name} in {self.storage_url}: its trials searched "
                                      f"{name} over {dist}, another space than this one")
        finished = sum(t.state.name in FINISHED for t in study.trials)
        say(f"autotune: resuming study {self.study_name}: {finished} finished trials in {self.storage_url}")
        return max(self.cfg.trials - finished, 0)

    def _sweep(self, storage: Any, trials: int) -> list[dict[str, Any]]:
        import ray
        from ray import tune

        from aios_ray.train.ray_train import ensure_ray

        ensure_ray(self.cfg.address)
        resources = self.cfg.resources()
        concurrent = self.cfg.max_concurrent or max(int(ray.cluster_resources().get("CPU", 1) // resources["cpu"]), 1)
        steps = int(self.base["train"]["steps"])
        say(f"autotune: {trials} trials of {steps} steps, {concurrent} at a time ({self.cfg.resources_per_trial} "
            f"each), sampler {self.cfg.sampler}, pruner {self.cfg.pruner}, {self.cfg.direction} {self.cfg.metric}; "
            f"study {self.study_name} in {self.storage_url}")
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=self.base, bundles=str(self.out / self.study_name / "trials"),
                                 threads=int(resources["cpu"])), resources)
        progress = Progress(trials, self.cfg.metric, self.cfg.mode, steps)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=self._searcher(storage), scheduler=self._scheduler(steps),
                                        num_samples=trials, max_concurrent_trials=concurrent,
                                        time_budget_s=self.cfg.timeout_minutes * 60 or None),
            run_config=tune.RunConfig(name=self.study_name, storage_path=str(self.out / "tune"), verbose=0,
                                      callbacks=[progress], failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        return [trial_record(result, self.cfg.metric, steps) for result in grid]

    def _searcher(self, storage: Any) -> Any:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TPE samples at random for its first n_startup_trials (Optuna's default 10): a sweep of 10 would never
        # be guided. A third of the study (2..10) explores at random, the rest follows the model.
        startup = min(10, max(2, self.cfg.trials // 3))
        sampler = (optuna.samplers.TPESampler(seed=self.cfg.seed, n_startup_trials=startup)
                   if self.cfg.sampler == "tpe" else optuna.samplers.RandomSampler(seed=self.cfg.seed))
        return OptunaSearch(space=self._define_by_run, metric=self.cfg.metric, mode=self.cfg.mode, sampler=sampler,
                            study_name=self.study_name, storage=storage)

    def _define_by_run(self, trial: Any) -> None:
        self.space.suggest(trial)

    def _scheduler(self, steps: int) -> Any:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

        # No trial stops before its first evaluation, nor before a quarter of its steps: until then a trial's
        # loss says more about its warm-up than about where it will end.
        grace = max(int(self.base["train"]["eval_interval"]), steps // 4)
        if self.cfg.pruner == "median":
            # min_time_slice=inf: the rule would otherwise pause a trial while too few others have results, and a
            # paused trial (no Tune checkpoint) restarts from scratch into a bundle that already exists.
            return MedianStoppingRule(time_attr="step", metric=self.cfg.metric, mode=self.cfg.mode,
                                      grace_period=grace, min_samples_required=2, min_time_slice=math.inf)
        if self.cfg.pruner == "successive_halving":
            return ASHAScheduler(time_attr="step", metric=self.cfg.metric, mode=self.cfg.mode, max_t=steps,
                                 grace_period=grace, reduction_factor=2)
        return FIFOScheduler()

    def _report(self, storage: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
        import optuna

        log = self.out / f"autotune_{self.stamp}.jsonl"
        with open(log, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        study = optuna.load_study(study_name=self.study_name, storage=storage)
        complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
        summary: dict[str, Any] = {"study_name": self.study_name, "storage": self.storage_url, "trials_log": str(log),
                                   "trials": records, "failed": sum(r["state"] == "failed" for r in records)}
        print_table(records, self.cfg.metric, self.cfg.mode)
        if complete:
            best = study.best_trial
            best_path = self.out / "best_trial.json"
            atomic_write_json(best_path, {"study_name": self.study_name, "trial_number": best.number,
                                          "metric": self.cfg.metric, "direction": self.cfg.direction,
                                          "value": best.value, "params": best.params,
                                          "yaml": yaml_snippet(best.params)})
            summary.update(best_value=best.value, best_params=best.params, best_trial=str(best_path))
            summary["plots"] = render_plots(study, self.out)
        return summary


class Progress(Callback):
    """A line per finished trial: its value, the best so far, trials done and the ETA."""

    def __init__(self, total: int, metric: str, mode: str, steps: int) -> None:
        self.total, self.metric, self.mode, self.steps = total, metric, mode, steps
        self.done, self.best, self.started = 0, None, time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        value = (trial.last_result or {}).get(self.metric)
        if value is not None and (self.best is None or (value < self.best) == (self.mode == "min")):
            self.best = value
        self._line(trial, f"{self.metric} {value:.4f}" if value is not None else "no metric")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed")

    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        step = (trial.last_result or {}).get("step")
        stopped = " (stopped early)" if step is not None and step < self.steps and what != "failed" else ""
        best = f"{self.best:.4f}" if self.best is not None else "n/a"
        say(f"autotune  trial {self.done}/{self.total} {trial.trial_id}: {what}{stopped} | best {best} | "
            f"elapsed {format_seconds(elapsed)} | ETA {format_seconds(eta)}")


def trial_record(result: Any, metric: str, steps: int) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    params = dict(result.config or {})
    step = metrics.get("step")
    failed = result.error is not None
    state = "failed" if failed else "pruned" if step is not None and step < steps else "complete"
    error = _reason(result.error) if failed else None
    return {"trial_id": metrics.get("trial_id") or Path(str(result.path)).name, "state": state, "params": params,
            "metric": metric, "value": metrics.get(metric), "step": step, "eval_loss": metrics.get("eval_loss"),
            "train_loss": metrics.get("train_loss"), "duration_s": metrics.get("time_total_s"),
            "ended_at": metrics.get("timestamp"),
            "node_id": metrics.get("node_id"), "error": error}


def _reason(error: BaseException) -> str:
    """The root cause of a trial's error in one line (Tune wraps it in its own exception types)."""
    cause: BaseException = error
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__  # type: ignore[assignment]
    text = str(cause).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(cause).__name__)
    return f"{type(cause).__name__}: {last.strip()}"[:300]


def print_table(records: list[dict[str, Any]], metric: str, mode: str, top: int = 5) -> None:
    if not records:
        return
    ok = [r for r in records if r["value"] is not None and r["state"] != "failed"]
    ok.sort(key=lambda r: r["value"], reverse=mode == "max")
    print(f"\ntop trials of this sweep ({metric}, {'lower' if mode == 'min' else 'higher'} is better):")
    print(f"  {'trial':<16} {'state':<9} {metric:>10}  params")
    for r in ok[:top]:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(r["params"].items()))
        print(f"  {r['trial_id']:<16} {r['state']:<9} {r['value']:>10.4f}  {params}")
    failed = [r for r in records if r["state"] == "failed"]
    for r in failed:
        print(f"  {r['trial_id']:<16} failed     {'':>10}  {r['error']}")


def render_plots(study: Any, out: Path) -> dict[str, str]:
    """Optuna's optimisation history and parameter importances (its own evaluator) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the plots are "experimental"
    plots = {}
    for name, draw in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances)):
        path = out / f"autotune_{name}.png"
        try:
            axes = draw(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two complete trials
            say(f"autotune: no {name} plot ({exc})")
            continue
        axes.figure.tight_layout()
        axes.figure.savefig(path, dpi=110)
        plt.close(axes.figure)
        plots[name] = str(path)
    return plots


def open_storage(url: str) -> Any:
    """The Optuna RDB storage at ``url`` (created if new); one line naming it when it cannot be opened."""
    import optuna

    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # OSError, and sqlalchemy's many kinds: unwritable file, bad URL, unknown driver
        raise ConfigError(f"--storage {url}: cannot open ({str(exc).splitlines()[0][:160]})") from None


def absolute_paths(sections: dict[str, Any]) -> dict[str, Any]:
    """Path settings made absolute: a trial runs in its own working directory."""
    out = {name: dict(section) for name, section in sections.items()}
    for section, key in (("train", "dataset_file"), ("train", "data"), ("train", "eval_file"), ("train", "tokenizer"),
                         ("train", "model"), ("train", "stop_file"), ("cluster", "storage_path")):
        value = out[section].get(key)
        if value and os.path.exists(value):
            out[section][key] = str(Path(value).resolve())
    return out


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_autotune(cfg: AutotuneConfig, space: SearchSpace, base: Config) -> dict[str, Any]:
    return Autotune(cfg, space, base).run()


