"""`aios-ray flow hrm-train`: prepare -> train -> evaluate -> package as Ray tasks, each step cached by the content
hash of its inputs.

Ray tests run the `debug` preset (6 steps) on ~40 KB of the sample corpus: seconds per flow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from aios_ray.cli import main
from aios_ray.flow import hrm_train
from aios_ray.flow.steps import dedupe, prepare_data, split_held_out
from aios_ray.train.bundle import is_bundle

SAMPLE = Path(__file__).resolve().parents[1] / "aios_ray" / "data" / "sample"
STEPS = ("prepare", "train", "evaluate", "package")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text((SAMPLE / "train.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def flow_args(flows: Path, dataset: Path, *extra: str) -> list[str]:
    return ["flow", "hrm-train", "--dataset-file", str(dataset), "--brain-name", "t", "--flow-dir", str(flows),
            "--train-args", "--config debug", *extra]


def step_lines(out: str) -> dict[str, str]:
    """The last progress word of each step (started, cached or done)."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "flow" and words[1] in (*STEPS, "autotune"):
            found[words[1]] = words[2]
    return found


def finished(flows: Path, step: str) -> list[Path]:
    return [d for d in (flows / "t").glob(f"{step}-*") if (d / "done.json").is_file()]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.ray
def test_the_flow_runs_end_to_end_and_a_second_run_is_served_from_cache(ray_local, tmp_path: Path, corpus: Path,
                                                                        capsys):
    flows = tmp_path / "flows"
    assert main(flow_args(flows, corpus, "--eval-batches", "2")) == 0
    assert step_lines(capsys.readouterr().out) == dict.fromkeys(STEPS, "done")

    [package] = finished(flows, "package")
    bundle = package / "t"
    assert is_bundle(bundle) and (bundle / "model.safetensors").is_file() and (bundle / "tokenizer.json").is_file()
    assert not (bundle / "ray_results").exists()
    card = (bundle / "MODEL_CARD.md").read_text(encoding="utf-8")
    metrics = json.loads((finished(flows, "evaluate")[0] / "metrics.json").read_text())
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() in card  # what `sha256sum` prints for the data
    assert f"| eval_loss | {metrics['eval_loss']:.4f} |" in card and f"{metrics['ppl']:.2f}" in card
    assert main(["eval", "--model", str(bundle), "--eval-file", str(corpus), "--eval-batches", "1"]) == 0

    before = mtimes(flows)
    assert main(flow_args(flows, corpus, "--eval-batches", "2")) == 0
    out = capsys.readouterr().out
    assert step_lines(out) == dict.fromkeys(STEPS, "cached"), out
    assert "every step served from cache" in out
    assert mtimes(flows) == before  # nothing retrained, repackaged or rewritten


@pytest.mark.ray
def test_a_failed_step_keeps_the_earlier_outputs_and_a_rerun_resumes_there(ray_local, tmp_path: Path,
                                                                           corpus: Path, capsys, monkeypatch):
    def crash(*args: object) -> None:
        raise RuntimeError("the evaluate worker crashed")

    flows = tmp_path / "flows"
    monkeypatch.setattr(hrm_train, "evaluate_task", ray_local.remote(max_retries=0)(crash))
    assert main(flow_args(flows, corpus)) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "flow step 'evaluate' failed" in err[0] and "evaluate worker crashed" in err[0], err
    assert step_lines(captured.out) == {"prepare": "done", "train": "done", "evaluate": "started"}
    [train] = finished(flows, "train")
    assert finished(flows, "prepare") and not finished(flows, "evaluate") and not finished(flows, "package")
    trained = mtimes(train)

    monkeypatch.undo()
    assert main(flow_args(flows, corpus)) == 0
    assert step_lines(capsys.readouterr().out) == {"prepare": "cached", "train": "cached", "evaluate": "done",
                                                   "package": "done"}
    assert mtimes(train) == trained  # not trained again
    assert len(list((flows / "t").glob("evaluate-*"))) == 1  # the failed attempt's leftovers are gone


@pytest.mark.ray
@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file or directory"),
    (b"", "empty file"),
    (b"\n\n  \n", "empty file"),
    (b"text\x00\x01\x02 more", "binary file"),
    (b"caf\xe9 au lait", "not UTF-8 text"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(ray_local, tmp_path: Path, capsys, content: bytes | None,
                                                        message: str):
    dataset = tmp_path / "data.txt"
    if content is not None:
        dataset.write_bytes(content)
    flows = tmp_path / "flows"
    assert main(flow_args(flows, dataset)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(dataset.name) in err[0], err
    assert not flows.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--eval-batches", "0"], "--eval-batches and --eval-batch-size must be > 0"),
    (["--eval-fraction", "1.5"], "--eval-fraction must be in (0, 1)"),
    (["--brain-name", ".."], "--brain-name '..' is not a plain directory name"),
    (["--train-args", "--eval-file x.txt --config debug"], "give the data with the flow's --dataset-file"),
    (["--train-args", "--model some/bundle --config debug"], "the flow trains a new bundle"),
    (["--autotune-args", "--trials 2"], "--autotune-args needs --autotune"),
    (["--autotune", "--autotune-args", "--out-dir elsewhere"], "--autotune-args --out-dir: the flow sets it"),
    (["--autotune", "--autotune-args", "--lr-min 0.1 --lr-max 0.01"], "--lr-min/--lr-max: empty range"),
])
def test_impossible_settings_are_one_line_exit_2_and_write_nothing(tmp_path: Path, corpus: Path, capsys,
                                                                   extra: list[str], message: str):
    flows = tmp_path / "flows"
    assert main(flow_args(flows, corpus, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not flows.exists()


def test_prepare_drops_duplicates_and_holds_out_documents_by_their_content(tmp_path: Path):
    docs = [f"document number {i} about the parser" for i in range(20)]
    dataset = tmp_path / "d.txt"
    dataset.write_text("\n\n".join([*docs, docs[3], "document  number 5 about\nthe parser"]), encoding="utf-8")
    out = prepare_data(str(tmp_path / "p"), str(dataset), None, 0.2, False, None, 300)
    assert out["stats"]["documents_read"] == 22 and out["stats"]["duplicates_removed"] == 2
    read = {name: [json.loads(line)["text"] for line in (tmp_path / "p" / out[name]).read_text().splitlines()]
            for name in ("train", "eval")}
    assert len(read["eval"]) == 4 and sorted(read["train"] + read["eval"]) == sorted(docs)
    # the split depends on the text alone: another order of the same documents holds out the same ones
    assert split_held_out(docs[::-1], 0.2, "d")[1] == [d for d in docs[::-1] if d in read["eval"]]
    assert dedupe(["a b", "a  b", "c"]) == (["a b", "c"], 1)


def test_an_eval_file_loses_the_documents_that_are_also_training_data(tmp_path: Path):
    (tmp_path / "train.txt").write_text("alpha beta\n\ngamma delta\n\nepsilon zeta", encoding="utf-8")
    (tmp_path / "eval.txt").write_text("gamma delta\n\neta theta\n\neta theta", encoding="utf-8")
    out = prepare_data(str(tmp_path / "p"), str(tmp_path / "train.txt"), str(tmp_path / "eval.txt"), 0.1, False,
                       None, 300)
    assert (out["stats"]["eval_overlap_removed"], out["stats"]["eval_duplicates_removed"]) == (1, 1)
    assert (tmp_path / "p" / out["eval"]).read_text().splitlines() == ['{"text": "eta theta"}']


@pytest.mark.ray
def test_autotune_before_train_trains_with_the_best_trials_values(ray_local, tmp_path: Path, corpus: Path, capsys):
    flows = tmp_path / "flows"
    sweep = "--trials 2 --sampler random --pruner none --max-concurrent 2 --num-experts-choices 2,4 " \
            "--batch-choices 2,4"
    assert main(flow_args(flows, corpus, "--eval-batches", "2", "--autotune", "--autotune-args", sweep)) == 0
    assert step_lines(capsys.readouterr().out) == dict.fromkeys(("prepare", "autotune", *STEPS[1:]), "done")
    best = json.loads((finished(flows, "autotune")[0] / "best.json").read_text())["best_params"]
    [train] = finished(flows, "train")
    trained = json.loads((train / "t" / "training_args.json").read_text())
    assert trained["train"]["lr"] == best["lr"] and trained["train"]["batch_size"] == best["batch_size"]
    assert trained["model"]["num_experts"] == best["num_experts"]
    assert "autotune best trial" in (finished(flows, "package")[0] / "t" / "MODEL_CARD.md").read_text()
