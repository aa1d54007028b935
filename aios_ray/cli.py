"""``aios-ray`` command line. Train flags are generated from the config dataclasses, so the field
help text is the ``--help`` text and there is one source of truth for names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aios_ray.config import SECTIONS, Config, StoreConfig, build_section, load_yaml_config, merge
from aios_ray.data.cli import add_commands as add_data_commands
from aios_ray.errors import UserError
from aios_ray.experts.cli import add_commands as add_expert_commands
from aios_ray.flow.settings import FlowSettings
from aios_ray.rl.config import RLConfig
from aios_ray.seed_flags import add_seed_flags, seed_train_flags
from aios_ray.tune.settings import AutotuneConfig
from aios_ray.tune.space import SearchSpace


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; a user error here is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_flags(parser: argparse.ArgumentParser, sections: dict[str, type] | None = None) -> None:
    for section, section_cls in (sections or SECTIONS).items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(section_cls):
            if not f.metadata.get("cli", True):
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f"{f.metadata['help']} (default: {default})"
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                      "help": help_text}
            if kind.startswith("bool"):
                negative = f.metadata.get("negative") or "--no-" + flag[2:]
                group.add_argument(flag, action="store_const", const=True, **kwargs)
                kwargs["help"] = f"turn {flag} off"
                group.add_argument(negative, action="store_const", const=False, **kwargs)
                continue
            else:
                kwargs["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
                kwargs["metavar"] = f.name.upper()
            group.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="aios-ray", description="HRM ACTv1 + MoE training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train (or resume) a brain bundle",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", metavar="NAME_OR_YAML",
                       help="preset name (configs/NAME.yaml) or a YAML file; flags override it")
    _add_config_flags(train)
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a brain bundle on a text file")
    evaluate.add_argument("--model", required=True, help="brain bundle directory")
    evaluate.add_argument("--eval-file", required=True, help=".txt, .jsonl or a folder of them")
    evaluate.add_argument("--eval-batches", type=int, default=16, help="most batches to evaluate (default: 16)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    evaluate.add_argument("--ascii-only", action="store_true", help="drop non-ASCII characters")
    evaluate.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    evaluate.set_defaults(func=_cmd_eval)

    generate = commands.add_parser("generate", help="continue a prompt with a brain bundle, streaming the text")
    generate.add_argument("--model", required=True, help="brain bundle directory")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    generate.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all "
                          "(default: 50)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1] "
                          "(default: 0.95)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    generate.add_argument("--goal", action="append", default=[], metavar="TEXT",
                          help="route towards the experts of this goal: its id or exact text in the goals DB "
                               "(repeatable)")
    generate.add_argument("--db", help="goals DB for --goal (default: $AIOS_ARTIFACTS or artifacts, + /aios.db)")
    generate.add_argument("--goal-bias-strength", type=float, default=2.0,
                          help="added to the router logits of the --goal experts (default: 2.0)")
    generate.set_defaults(func=_cmd_generate)

    export_hf = commands.add_parser("export-hf", help="write a brain bundle as a Hugging Face transformers model "
                                    "directory (AutoModelForCausalLM after aios_ray.hf.register())")
    export_hf.add_argument("--model", required=True, help="brain bundle directory")
    export_hf.add_argument("--out", required=True, help="output directory")
    export_hf.set_defaults(func=_cmd_export_hf)

    plot = commands.add_parser("plot", help="render a metrics JSONL to PNG (losses, halting, expert usage)")
    plot.add_argument("--log-file", required=True, help="metrics JSONL written by train")
    plot.add_argument("--out", help="PNG path (default: next to the log file, .png)")
    plot.set_defaults(func=_cmd_plot)
    report = commands.add_parser("report", help="write every PNG of a run (overview, expert usage) into a folder")
    report.add_argument("run", metavar="RUN", help="a brain bundle (its metrics.jsonl) or a metrics JSONL")
    report.add_argument("--out-dir", help="folder for the PNGs (default: <run's folder>/report)")
    report.set_defaults(func=_cmd_report)

    rl = commands.add_parser("rl", help="sequential multi-game RL on RLlib (MoE agent, environment detector)")
    rl_commands = rl.add_subparsers(dest="rl_command", required=True, parser_class=OneLineParser)
    sequential = rl_commands.add_parser("sequential", help="play the games one after another; evaluate every game "
                                        "after each phase (retention matrix)",
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sequential.add_argument("--config", metavar="NAME_OR_YAML",
                            help="preset name (configs/NAME.yaml) or a YAML file with an 'rl:' section")
    sequential.add_argument("--resume", metavar="RUN_DIR",
                            help="continue this run from its newest checkpoint, with the settings it started with")
    _add_config_flags(sequential, {"rl": RLConfig, "store": StoreConfig})
    sequential.set_defaults(func=_cmd_rl_sequential)
    rl_report = rl_commands.add_parser("report", help="render a run's PNGs: return curves with phase boundaries, "
                                       "retention heatmap, game x expert usage, tier hit rate")
    rl_report.add_argument("run_dir", metavar="RUN_DIR", help="directory of an `rl sequential` run")
    rl_report.set_defaults(func=_cmd_rl_report)
    rl_compare = rl_commands.add_parser("compare", help="forgetting, forward transfer and final normalised return "
                                        "of two runs side by side (e.g. MoE vs --dense)")
    rl_compare.add_argument("run_a", metavar="RUN_A", help="directory of the first run")
    rl_compare.add_argument("run_b", metavar="RUN_B", help="directory of the second run")
    rl_compare.set_defaults(func=_cmd_rl_compare)

    autotune = commands.add_parser("autotune", help="hyper-parameter sweep on Ray Tune + Optuna; every trial trains "
                                   "like `aios-ray train`")
    autotune.add_argument("--config", metavar="NAME_OR_YAML", help="the base preset or YAML file of every trial")
    autotune.add_argument("--dataset-file", help="training text (default: the shipped sample corpus)")
    autotune.add_argument("--eval-file", help="held-out text the metric is measured on")
    autotune.add_argument("--eval-batches", type=int, help="batches per evaluation (default: the base config's)")
    autotune.add_argument("--train-args", default="", metavar='"FLAGS"',
                          help='more `aios-ray train` flags for every trial, e.g. "--steps 60 --hidden-size 64"')
    _add_config_flags(autotune, {"autotune": AutotuneConfig, "space": SearchSpace})
    autotune.set_defaults(func=_cmd_autotune)

    flow = commands.add_parser("flow", help="pipelines of Ray tasks whose steps are cached by content hash")
    flow_commands = flow.add_subparsers(dest="flow_command", required=True, parser_class=OneLineParser)
    hrm_train = flow_commands.add_parser("hrm-train", help="prepare -> train -> evaluate -> package (bundle + "
                                         "MODEL_CARD.md); a re-run resumes at the first step not done",
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_flags(hrm_train, {"flow": FlowSettings})
    hrm_train.add_argument("--train-args", default="", metavar='"FLAGS"',
                           help='`aios-ray train` flags of the train step, e.g. "--config debug --steps 60"')
    hrm_train.add_argument("--autotune", action="store_true",
                           help="run an `aios-ray autotune` sweep before train and train with its best trial")
    hrm_train.add_argument("--autotune-args", metavar='"FLAGS"',
                           help='`aios-ray autotune` flags of the sweep, e.g. "--trials 20 --pruner none"')
    hrm_train.set_defaults(func=_cmd_flow_hrm_train)

    store = commands.add_parser("store", help="the tiered expert store")
    store_commands = store.add_subparsers(dest="store_command", required=True, parser_class=OneLineParser)
    stats = store_commands.add_parser("stats", help="per-tier occupancy, hit rates and bytes moved")
    stats.add_argument("--store-path", help="a (finished or running) run's expert_store directory")
    stats.add_argument("--name", help="brain name of a running store (its actors are found by name)")
    stats.add_argument("--namespace", default="aios-ray", help="Ray namespace of the store (default: aios-ray)")
    stats.add_argument("--address", help="Ray cluster address for --name (default: auto)")
    stats.set_defaults(func=_cmd_store_stats)
    gc = store_commands.add_parser("gc", help="remove hot-tier slabs in /dev/shm that no live process holds (left "
                                   "by runs killed before their cleanup); never one a live process maps")
    gc.add_argument("--dry-run", action="store_true", help="list the orphans with their sizes, remove nothing")
    gc.add_argument("--store-path", help="only the slabs of this store (a run's expert_store directory)")
    gc.set_defaults(func=_cmd_store_gc)

    add_expert_commands(commands, OneLineParser)  # experts ..., goals ..., goals-add ...
    add_data_commands(commands, OneLineParser)  # data prepare
    _add_attach_command(commands)
    add_seed_flags(parser)  # the seed documents' spellings: aliases, pass-throughs, one-line answers
    return parser


def _add_attach_command(commands: argparse._SubParsersAction) -> None:
    """``experts attach``: registered here, not with the other ``experts`` commands, because it loads weights
    (torch) and aios_ray.experts stays free of torch."""
    experts = commands.choices["experts"]
    sub = next(a for a in experts._actions if isinstance(a, argparse._SubParsersAction))
    attach = sub.add_parser("attach", help="write a new brain: --model with the expert appended to every MoE layer",
                            description="write a new brain: --model with the expert appended to every MoE layer")
    attach.add_argument("--model", required=True, help="brain bundle directory (read only)")
    attach.add_argument("--expert-id", required=True, metavar="ID", help="a registry expert with weights")
    attach.add_argument("--out", help="the new brain bundle (default: <model>-<ID> next to it)")
    attach.add_argument("--registry", help="expert registry JSON (default: $AIOS_ARTIFACTS or artifacts, "
                        "+ /experts/registry.json)")
    attach.set_defaults(func=_cmd_experts_attach)


def config_from_args(args: argparse.Namespace) -> Config:
    base = load_yaml_config(args.config) if args.config else {}
    return Config.from_dict(merge(base, _sections(args)), source="flags")


def _cmd_train(args: argparse.Namespace) -> int:
    from aios_ray.train.run import run_training

    cfg = config_from_args(args)
    plan, summary = run_training(cfg)
    print(f"done: step {summary.get('step')}"
          + (f", eval_loss {summary['eval_loss']:.4f} (ppl {summary['ppl']:.2f})" if "eval_loss" in summary else ""))
    if "expert_file" in summary:  # expert-only training
        print(f"expert:       {summary['expert_file']} (eval_loss base {summary['eval_loss_base']:.4f}, before "
              f"{summary['eval_loss_before']:.4f}, after {summary['eval_loss_after']:.4f})"
              + (f"; linked to goal {summary['goal_id']}" if summary.get("goal_id") else ""))
    print(f"brain bundle: {plan.bundle_root}")
    print(f"metrics:      {plan.log_file}")
    return 0


def _cmd_autotune(args: argparse.Namespace) -> int:
    from aios_ray.tune.autotune import run_autotune

    sections = _sections(args)
    cfg = build_section(AutotuneConfig, sections.get("autotune", {}), "flags")
    space = build_section(SearchSpace, sections.get("space", {}), "flags")
    preset = ["--config", args.config] if args.config else []
    train_argv = ["train", *preset, *_split_flags("--train-args", args.train_args), *seed_train_flags(args)]
    for flag, value in (("--dataset-file", args.dataset_file), ("--eval-file", args.eval_file),
                        ("--eval-batches", args.eval_batches)):
        if value is not None:
            train_argv += [flag, str(value)]
    base = config_from_args(build_parser().parse_args(train_argv))
    summary = run_autotune(cfg, space, base)
    print(f"trials log:   {summary['trials_log']}")
    if "best_trial" in summary:
        print(f"best trial:   {summary['best_trial']} ({cfg.metric} {summary['best_value']:.4f})")
        for name, path in summary.get("plots", {}).items():
            print(f"{name + ' plot:':<13} {path}")
    trials = summary["trials"]
    if trials and summary["failed"] == len(trials):
        print(f"aios-ray: every trial of this sweep failed (first: {trials[0]['error']})", file=sys.stderr)
        return 1
    return 0


def _cmd_flow_hrm_train(args: argparse.Namespace) -> int:
    from aios_ray.flow.hrm_train import FlowFailed, run_hrm_train

    settings = build_section(FlowSettings, _sections(args).get("flow", {}), "flags")
    base = config_from_args(build_parser().parse_args(["train", *_split_flags("--train-args", args.train_args),
                                                       *seed_train_flags(args)]))
    try:
        summary = run_hrm_train(settings, base, _flow_autotune(args))
    except FlowFailed as exc:
        print(f"aios-ray: {exc}", file=sys.stderr)
        return 1
    print(f"brain bundle: {summary['bundle']}")
    print(f"model card:   {summary['model_card']}")
    print(f"eval_loss={summary['eval_loss']:.4f} ppl={summary['ppl']:.2f}")
    return 0


def _flow_autotune(args: argparse.Namespace) -> tuple[AutotuneConfig, SearchSpace] | None:
    """The sweep's settings from --autotune-args, read as `aios-ray autotune` reads its flags; the data, base
    config, outputs and cluster are the flow's own."""
    if not args.autotune:
        if args.autotune_args is not None:
            raise UserError("--autotune-args needs --autotune")
        return None
    tune_args = build_parser().parse_args(["autotune", *_split_flags("--autotune-args", args.autotune_args or "")])
    sections = _sections(tune_args)
    taken = [flag for flag, given in (("--config", tune_args.config), ("--dataset-file", tune_args.dataset_file),
                                      ("--eval-file", tune_args.eval_file), ("--train-args", tune_args.train_args),
                                      ("--eval-batches", tune_args.eval_batches),
                                      ("--out-dir", "out_dir" in sections.get("autotune", {})),
                                      ("--address", "address" in sections.get("autotune", {}))) if given]
    if taken:
        raise UserError(f"--autotune-args {taken[0]}: the flow sets it (data and base config from the flow's "
                        f"flags and --train-args, outputs in its autotune step)")
    return (build_section(AutotuneConfig, sections.get("autotune", {}), "--autotune-args"),
            build_section(SearchSpace, sections.get("space", {}), "--autotune-args"))


def _split_flags(flag: str, text: str) -> list[str]:
    import shlex

    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UserError(f"{flag} {text!r}: {exc}") from None


def _sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flag values by section (flags whose dest is 'section.name')."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def _cmd_rl_sequential(args: argparse.Namespace) -> int:
    from aios_ray.rl.config import load_rl_yaml, rl_config_from_dict
    from aios_ray.rl.sequential import resume_sequential, run_sequential

    sections = _sections(args)
    flags, store_flags = sections.get("rl", {}), sections.get("store", {})
    if args.resume:
        if args.config or flags or store_flags:
            raise UserError("--resume takes the run's own settings: give no --config or other flags with it")
        summary = resume_sequential(args.resume)
    else:
        values = load_rl_yaml(args.config) if args.config else {}
        store_values = {**values.pop("store", {}), **store_flags}
        store = build_section(StoreConfig, store_values, args.config or "flags")
        summary = run_sequential(rl_config_from_dict({**values, **flags}, source=args.config or "flags"), store)
    print(f"run directory:    {summary['run_dir']}")
    print(f"retention matrix: {summary['run_dir']}/retention.json (and .csv)")
    return 0


def _cmd_rl_report(args: argparse.Namespace) -> int:
    from aios_ray.rl.report import render_report

    for path in render_report(Path(args.run_dir)):
        print(path)
    return 0


def _cmd_rl_compare(args: argparse.Namespace) -> int:
    from aios_ray.rl.report import compare_runs

    print(compare_runs(Path(args.run_a), Path(args.run_b)))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from aios_ray.train.evaluate import evaluate_bundle

    loss, ppl, num_batches = evaluate_bundle(Path(args.model), args.eval_file, args.eval_batches, args.batch_size,
                                             args.ascii_only, args.amp)
    print(f"eval_loss={loss:.4f} ppl={ppl:.2f} batches={num_batches}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from aios_ray.generate import check_sampling, generate_text, load_brain

    # Flags and prompt first: a bad value costs no model load.
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if not args.prompt:
        raise UserError("--prompt is empty")
    model, tokenizer, _ = load_brain(args.model)
    for piece in generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               goals=args.goal, goals_db=args.db, goal_bias_strength=args.goal_bias_strength):
        print(piece, end="", flush=True)
    print()
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from aios_ray.hf import export_hf

    print(f"transformers model: {export_hf(args.model, args.out)}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from aios_ray.tracking.plots import plot_expert_usage, plot_run

    log_file = Path(args.log_file)
    out = plot_run(log_file, Path(args.out) if args.out else log_file.with_suffix(".png"))
    print(f"plot: {out}")
    usage = plot_expert_usage(log_file, out.with_name(f"{out.stem}_expert_usage.png"))
    if usage:
        print(f"plot: {usage}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from aios_ray.tracking.plots import render_report

    run = Path(args.run)
    log_file = run / "metrics.jsonl" if run.is_dir() else run
    for path in render_report(log_file, Path(args.out_dir) if args.out_dir else log_file.parent / "report"):
        print(path)
    return 0


def _cmd_experts_attach(args: argparse.Namespace) -> int:
    from aios_ray.train.attach import attach_expert

    done = attach_expert(args.model, args.expert_id, args.registry, args.out)
    if done.note:
        print(done.note)
    print(f"attached {args.expert_id} as expert {done.index} of every MoE layer: {done.bundle}")
    return 0


def _cmd_store_stats(args: argparse.Namespace) -> int:
    from aios_ray.config import StoreConfig
    from aios_ray.store.report import finished_store_stats, format_table

    if bool(args.store_path) == bool(args.name):
        raise UserError("store stats: give exactly one of --store-path (any store) or --name (a running one)")
    config = StoreConfig(experts="tiered", path=args.store_path, name=args.name, namespace=args.namespace)
    if args.store_path:
        stats = finished_store_stats(config)
    else:
        from actors.tier_actors import live_store_stats  # Ray is imported only when it is used

        stats = live_store_stats(config, args.address)
    print(format_table(stats))
    return 0


def _cmd_store_gc(args: argparse.Namespace) -> int:
    from aios_ray.store.orphans import sweep
    from aios_ray.store.report import format_sweep

    print(format_sweep(sweep(args.store_path, remove=not args.dry_run), dry_run=args.dry_run))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"aios-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aios-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
