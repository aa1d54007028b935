"""``aios-ray flow hrm-train``: data -> train -> evaluate -> package, each step a plain Ray task.

- ``prepare`` validates and reads the text (``aios_ray.data.text``), drops duplicate documents, holds out an
  eval split when no ``--eval-file`` is given and builds the tokenizer (``aios_ray.flow.steps``);
- ``autotune`` (``--autotune``) is a Ray Tune sweep on the prepared data (``aios_ray.tune.autotune``). It runs
  from the driver: Tune already spreads its trials over the cluster as Ray actors;
- ``train`` is ``aios-ray train`` (``run_training``) with the flow's config and, after a sweep, the best
  trial's values;
- ``evaluate`` is ``aios-ray eval`` (``evaluate_bundle``) of the bundle on the held-out text;
- ``package`` copies the bundle and writes ``MODEL_CARD.md`` (metrics, the data's sha256, provenance).

The driver decides what runs: a step whose inputs hash to a finished step directory is served from it
(``aios_ray.flow.cache``), so a re-run after a failure resumes at the failed step and an identical re-run runs
nothing. Steps read and write the flow directory, so on a cluster it must be on storage every node sees.
One run per brain name at a time: a run removes the unfinished step directories it finds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from aios_ray.config import Config, ConfigError
from aios_ray.durable import atomic_write_json
from aios_ray.errors import UserError
from aios_ray.flow import cache, steps
from aios_ray.flow.settings import FlowSettings
from aios_ray.flow.shards_step import shard_inputs, shard_training_text
from aios_ray.tracking.jsonl import say
from aios_ray.tune.settings import AutotuneConfig
from aios_ray.tune.space import SearchSpace, apply_params

FLOW_VERSION = 1  # part of every key: raise it when a step's outputs change meaning, and every cache is stale
LATEST = "latest.json"

# No retries: a step that a crash interrupted is re-run by the next flow run, from an empty directory.
prepare_task = ray.remote(num_cpus=1, max_retries=0)(steps.prepare_data)
train_task = ray.remote(max_retries=0)(steps.train_model)
evaluate_task = ray.remote(num_cpus=1, max_retries=0)(steps.evaluate_model)
package_task = ray.remote(num_cpus=1, max_retries=0)(steps.package_bundle)


class FlowFailed(RuntimeError):
    """A step failed for a reason other than bad input (a crash, out of memory, a bug): exit code 1."""


class FlowInputError(UserError):
    """A step refused its input; the message names the step and the culprit: exit code 2."""


@dataclass
class Step:
    name: str
    directory: Path
    key: str
    output_hash: str
    outputs: dict[str, Any]
    cached: bool

    def path(self, relative: str) -> str:
        return str(self.directory / relative)


class HrmTrainFlow:
    def __init__(self, settings: FlowSettings, base: Config,
                 autotune: tuple[AutotuneConfig, SearchSpace] | None = None) -> None:
        check_base(base)
        self.settings, self.base, self.autotune = settings, base, autotune
        self.root = Path(settings.flow_dir).resolve() / settings.brain_name
        self.steps: list[Step] = []

    def run(self) -> dict[str, Any]:
        s = self.settings
        assert s.dataset_file is not None  # FlowSettings refuses a missing one
        # Hashing reads every byte: a missing path is refused here, before Ray starts or anything is written.
        data = {"path": str(Path(s.dataset_file).resolve()), "sha256": cache.data_sha256(s.dataset_file,
                                                                                         "--dataset-file")}
        held_out = ({"path": str(Path(s.eval_file).resolve()), "sha256": cache.data_sha256(s.eval_file,
                                                                                          "--eval-file")}
                    if s.eval_file else None)
        from aios_ray.train.ray_train import ensure_ray  # Ray Train's imports are heavy: only when running

        ensure_ray(s.address)
        prepare = self._prepare(data, held_out)
        sections = self.base.to_dict()
        tuned = self._autotune(prepare, sections) if self.autotune else None
        if tuned is not None:
            sections = apply_params(sections, tuned.outputs["best_params"])
        train = self._train(prepare, tuned, sections)
        evaluate = self._evaluate(prepare, train)
        package = self._package(data, held_out, prepare, tuned, train, evaluate)
        return self._finish(package, evaluate)

    # ---- the steps ------------------------------------------------------------------------------------

    def _prepare(self, data: dict[str, str], held_out: dict[str, str] | None) -> Step:
        s, tc = self.settings, self.base.train
        tokenizer = _tokenizer_file(tc.tokenizer)
        inputs = {"data": data["sha256"], "eval_file": held_out and held_out["sha256"],
                  "eval_fraction": None if held_out else s.eval_fraction, "ascii_only": tc.ascii_only,
                  "tokenizer": cache.file_sha256(tokenizer) if tokenizer else None,
                  "vocab_size": None if tokenizer else tc.tokenizer_vocab_size}
        if tc.use_chunked_training:  # (only then in the key: the caches of other flows stay valid)
            inputs["shards"] = shard_inputs(self.base)

        def launch(out: str) -> dict[str, Any]:
            outputs = ray.get(prepare_task.remote(out, data["path"], held_out and held_out["path"], s.eval_fraction,
                                                  tc.ascii_only, str(tokenizer) if tokenizer else None,
                                                  tc.tokenizer_vocab_size))
            if tc.use_chunked_training:  # the training text as Parquet shards, tokenized on Ray Data
                outputs.update(shard_training_text(out, outputs, self.base))
            return outputs

        return self._step("prepare", inputs, launch)

    def _autotune(self, prepare: Step, sections: dict[str, Any]) -> Step:
        assert self.autotune is not None
        cfg, space = self.autotune
        tune_settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("address", "out_dir")}
        inputs = {"prepare": prepare.output_hash, "config": _portable(sections), "autotune": tune_settings,
                  "space": dataclasses.asdict(space)}
        return self._step("autotune", inputs, lambda out: sweep(out, cfg, space, with_data(sections, prepare)))

    def _train(self, prepare: Step, tuned: Step | None, sections: dict[str, Any]) -> Step:
        inputs = {"prepare": prepare.output_hash, "autotune": tuned and tuned.output_hash,
                  "config": _portable(sections)}
        cluster = sections["cluster"]
        # One worker: the task itself is the Ray unit and trains in its process (as an autotune trial does).
        # More: the task drives a Ray Train TorchTrainer, whose workers hold the CPUs/GPUs.
        in_process = cluster["num_workers"] == 1
        resources = ({"num_cpus": 1, "num_gpus": 1 if cluster["use_gpu"] else 0} if in_process
                     else {"num_cpus": 0, "num_gpus": 0})

        def launch(out: str) -> dict[str, Any]:
            config = with_data(sections, prepare)
            config["train"].update(bundle_dir=out, brain_name=self.settings.brain_name, log_file=None)
            config["cluster"]["use_ray"] = cluster["use_ray"] and not in_process
            return ray.get(train_task.options(**resources).remote(out, config))

        return self._step("train", inputs, launch)

    def _evaluate(self, prepare: Step, train: Step) -> Step:
        s, tc = self.settings, self.base.train
        inputs = {"prepare": prepare.output_hash, "train": train.output_hash, "eval_batches": s.eval_batches,
                  "batch_size": s.eval_batch_size, "ascii_only": tc.ascii_only, "amp": tc.amp}
        return self._step("evaluate", inputs, lambda out: ray.get(evaluate_task.remote(
            out, train.path(train.outputs["bundle"]), prepare.path(prepare.outputs["eval"]), s.eval_batches,
            s.eval_batch_size, tc.ascii_only, tc.amp)))

    def _package(self, data: dict[str, str], held_out: dict[str, str] | None, prepare: Step, tuned: Step | None,
                 train: Step, evaluate: Step) -> Step:
        upstream = [prepare, *([tuned] if tuned else []), train, evaluate]
        inputs = {"brain": self.settings.brain_name, "dataset": data, "eval_file": held_out,
                  **{step.name: step.output_hash for step in upstream}}
        facts = {"brain": self.settings.brain_name, "dataset": data, "eval_file": held_out,
                 "prepare": prepare.outputs["stats"], "train": train.outputs["summary"],
                 "evaluate": evaluate.outputs, "autotune": tuned.outputs if tuned else None,
                 "steps": {step.name: step.directory.name.split("-", 1)[1] for step in upstream}}
        return self._step("package", inputs, lambda out: ray.get(package_task.remote(
            out, train.path(train.outputs["bundle"]), self.settings.brain_name, facts)))

    # ---- running one step ---------------------------------------------------------------------------

    def _step(self, name: str, inputs: dict[str, Any], launch: Callable[[str], dict[str, Any]]) -> Step:
        inputs = {"step": name, "flow_version": FLOW_VERSION, **inputs}
        key = cache.content_key(inputs)
        directory = cache.step_dir(self.root, name, key)
        done = cache.read_done(directory, key)
        if done is not None:
            say(f"flow  {name:<9} cached   {directory}")
            return self._record(Step(name, directory, key, done["output_hash"], done["outputs"], cached=True))
        cache.clear_leftovers(self.root, name)
        say(f"flow  {name:<9} started")
        started = time.perf_counter()
        try:
            outputs = launch(str(directory))
        except Exception as exc:  # one line naming the step; the finished steps' directories stay
            raise step_error(name, exc) from None
        duration = time.perf_counter() - started
        output_hash = cache.tree_sha256(directory)
        cache.mark_done(directory, {"step": name, "key": key, "inputs": inputs, "output_hash": output_hash,
                                    "outputs": outputs, "duration_s": round(duration, 3),
                                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        say(f"flow  {name:<9} done in {duration:.1f}s   {directory}")
        return self._record(Step(name, directory, key, output_hash, outputs, cached=False))

    def _record(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    def _finish(self, package: Step, evaluate: Step) -> dict[str, Any]:
        cached = [step.name for step in self.steps if step.cached]
        if len(cached) == len(self.steps):
            say(f"flow: every step served from cache ({', '.join(cached)}); nothing ran")
        else:
            say(f"flow: {len(cached)} of {len(self.steps)} steps served from cache"
                + (f" ({', '.join(cached)})" if cached else ""))
        summary = {"brain": self.settings.brain_name, "bundle": package.path(package.outputs["bundle"]),
                   "model_card": package.path(package.outputs["model_card"]),
                   "eval_loss": evaluate.outputs["eval_loss"], "ppl": evaluate.outputs["ppl"],
                   "steps": {step.name: str(step.directory) for step in self.steps}}
        _write_if_changed(self.root / LATEST, summary)
        return {**summary, "cached": cached}


# ---- helpers --------------------------------------------------------------------------------------------


def check_base(base: Config) -> None:
    """Flags in --train-args that the flow itself sets would be silently replaced: refuse them."""
    tc = base.train
    if tc.dataset_file or tc.eval_file:
        raise ConfigError("--train-args: give the data with the flow's --dataset-file and --eval-file")
    if tc.model:
        raise ConfigError("--train-args --model: the flow trains a new bundle (give a tokenizer with --tokenizer)")


def with_data(sections: dict[str, Any], prepare: Step) -> dict[str, Any]:
    """The config sections reading the prepared text and tokenizer."""
    out = {name: dict(section) for name, section in sections.items()}
    out["train"].update(dataset_file=prepare.path(prepare.outputs["train"]),
                        eval_file=prepare.path(prepare.outputs["eval"]),
                        tokenizer=prepare.path(prepare.outputs["tokenizer"]))
    if "data" in prepare.outputs:  # --use-chunked-training: stream the step's shards instead of the text
        out["train"].update(data=prepare.path(prepare.outputs["data"]), dataset_file=None)
    return out


def sweep(out: str, cfg: AutotuneConfig, space: SearchSpace, sections: dict[str, Any]) -> dict[str, Any]:
    """The autotune step: the sweep's files in ``out``; its best trial's values for ``train``."""
    from aios_ray.tune.autotune import run_autotune

    shutil.rmtree(out, ignore_errors=True)
    summary = run_autotune(dataclasses.replace(cfg, out_dir=out), space, Config.from_dict(sections, "flow"))
    if "best_params" not in summary:
        first = next((t["error"] for t in summary["trials"] if t.get("error")), "no trial completed")
        raise RuntimeError(f"no trial of the sweep completed ({first})")
    best = {"best_params": summary["best_params"], "best_value": summary["best_value"], "metric": cfg.metric,
            "trials": len(summary["trials"]), "failed": summary["failed"]}
    atomic_write_json(Path(out) / "best.json", best)
    return best


def step_error(name: str, exc: BaseException) -> Exception:
    """A step's exception as one line: Ray wraps a task's exception; its cause is the one to name."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, UserError):
        return FlowInputError(f"flow step '{name}' failed: {cause}")
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return FlowFailed(f"flow step '{name}' failed: {type(cause).__name__}: {lines[-1] if lines else ''}"[:400])


def _tokenizer_file(tokenizer: str | None) -> Path | None:
    """The tokenizer.json --tokenizer names (a file or a directory holding one); refused here when absent."""
    if not tokenizer:
        return None
    from aios_ray.data.tokenizer import load_tokenizer

    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        load_tokenizer(tokenizer, "--tokenizer")  # raises the DataError that names it
    return file.resolve()


def _portable(sections: dict[str, Any]) -> dict[str, Any]:
    """The config as a step's input: where Ray runs does not change what is computed."""
    out = {name: dict(section) for name, section in sections.items()}
    out["cluster"].pop("address", None)
    return out


def _write_if_changed(path: Path, data: dict[str, Any]) -> None:
    """A run served from cache leaves every file as it was, this one too."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    atomic_write_json(path, data)


def run_hrm_train(settings: FlowSettings, base: Config,
                  autotune: tuple[AutotuneConfig, SearchSpace] | None = None) -> dict[str, Any]:
    return HrmTrainFlow(settings, base, autotune).run()
