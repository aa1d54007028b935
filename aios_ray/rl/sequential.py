"""Sequential multi-game PPO on RLlib: play game 1, then game 2, ...; after each phase evaluate every game.

Per phase (one game, ``steps_per_game`` env steps):

1. switch: the env runners make the phase's environment, and the learner's module restricts its MoE
   layers to the game's expert group and hands the env runners that group's experts;
2. train: ``algo.train()`` until the phase's env steps are sampled; after each iteration the environment
   detector learns from frames of the current game played by the current policy (the schedule knows the
   game, so the frames are labelled);
3. evaluate every game of the list (seen and not yet seen): the detector names the game from the first
   frame of each episode (the policy is never told), the module routes to the named game's group, and the
   episode is played with actions sampled from the policy (``--eval-greedy``: its most likely ones). The mean
   returns fill one row of the retention matrix.

Outputs in the run directory: ``metrics.jsonl`` (one ``iteration`` line per PPO iteration, a ``phase_end``
line per phase), ``retention.json`` and ``retention.csv`` (rows: after phase i; columns: games), with the
random-policy score of every game beside them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aios_ray.config import ConfigError, StoreConfig
from aios_ray.durable import atomic_write_bytes, atomic_write_json
from aios_ray.errors import DataError
from aios_ray.rl.checkpoint import ScheduleState, latest_checkpoint, load_checkpoint, save_checkpoint
from aios_ray.rl.config import RLConfig, rl_config_from_dict
from aios_ray.rl.detector import DetectorTrainer, EnvironmentDetector, SwitchWatch
from aios_ray.rl.envs import make_env, register_rllib_env, suite_spaces, validate_games
from aios_ray.rl.metrics import specialisation
from aios_ray.rl.module import MoEAgentModule, expert_groups, freeze_shared_everywhere, set_active_game_everywhere
from aios_ray.rl.tiered import RESUME_KEY, STORE_KEY
from aios_ray.tracking.jsonl import MetricsLog, format_seconds, say


@dataclasses.dataclass
class Phase:
    index: int  # position in the whole schedule (cycles included)
    game: str
    game_index: int  # position in the list of games: the expert group it owns


def plan_phases(games: list[str], cycles: int) -> list[Phase]:
    return [Phase(c * len(games) + i, game, i) for c in range(cycles) for i, game in enumerate(games)]


def model_config(cfg: RLConfig, num_games: int) -> dict[str, Any]:
    try:
        groups = expert_groups(cfg.num_experts, num_games, cfg.shared_experts)
    except ValueError as exc:
        raise ConfigError(f"--num-experts/--shared-experts: {exc}") from None
    if len(groups[0]) < cfg.num_experts_per_tok:
        raise ConfigError(f"each game's group has {len(groups[0])} experts, fewer than --num-experts-per-tok "
                          f"{cfg.num_experts_per_tok}: raise --num-experts or --shared-experts")
    return {"hidden": cfg.hidden, "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "expert_hidden": cfg.expert_hidden, "moe_layers": cfg.moe_layers, "dense": cfg.dense,
            "routing": cfg.routing, "groups": groups, "lb_coef": cfg.lb_coef, "game_heads": cfg.game_heads}


def build_algo(cfg: RLConfig, games: list[str], store: StoreConfig | None = None,
               resume_snapshot: str | None = None) -> Any:
    """RLlib PPO (new API stack) with the MoE agent and its learner, on the first game; ``store`` (resolved,
    ``experts="tiered"``) puts the learner's experts in the tiered expert store, which goes back to snapshot
    ``resume_snapshot`` first when given (a resumed run)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from aios_ray.rl.learner import MoEPPOLearner

    config = (
        PPOConfig()
        .environment(env=register_rllib_env(), env_config={"suite": cfg.suite, "game": games[0]})
        .env_runners(num_env_runners=cfg.num_env_runners, num_envs_per_env_runner=cfg.num_envs_per_env_runner,
                     rollout_fragment_length=cfg.rollout_length)
        .learners(num_learners=0, learner_class=MoEPPOLearner)
        .training(lr=cfg.lr, train_batch_size_per_learner=cfg.train_batch_size,
                  minibatch_size=min(cfg.minibatch_size, cfg.train_batch_size), num_epochs=cfg.num_epochs)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=MoEAgentModule,
                                               model_config={**model_config(cfg, len(games)),
                                                             STORE_KEY: dataclasses.asdict(store or StoreConfig()),
                                                             RESUME_KEY: resume_snapshot}))
        .debugging(seed=cfg.seed)
    )
    return config.build_algo()


def switch_game(algo: Any, cfg: RLConfig, phase: Phase) -> int:
    """The env runners play ``phase.game`` from now on, with its expert group; returns the bytes each env
    runner received for the switch (only the active group's experts travel)."""
    env_config = {"suite": cfg.suite, "game": phase.game}

    def remake(env_runner: Any) -> None:
        env_runner.config.environment(env_config=env_config)
        env_runner.make_env()

    algo.env_runner_group.foreach_env_runner(remake)
    freeze_shared_everywhere(algo, cfg.freezes_shared and phase.index > 0)
    sync_bytes = set_active_game_everywhere(algo, phase.game_index)
    full = _learner_module(algo).full_sync_nbytes(sync_bytes)
    say(f"rl  env runners receive {sync_bytes / 1024:,.0f} KiB per weight sync: the active group's experts only "
        f"(every expert: {full / 1024:,.0f} KiB)")
    return sync_bytes


def _local_learner(algo: Any) -> Any:
    """The learner (``num_learners=0``: it lives in this process), whose module and expert backends the
    schedule uses directly: evaluation, detector rollouts, prefetch at a switch, store counters."""
    return algo.learner_group._learner


def _learner_module(algo: Any) -> MoEAgentModule:
    from ray.rllib.core import DEFAULT_MODULE_ID

    return _local_learner(algo).module[DEFAULT_MODULE_ID].unwrapped()


@torch.no_grad()
def policy_action(module: MoEAgentModule, obs: np.ndarray, rng: np.random.Generator, greedy: bool) -> int:
    """The policy's action: sampled from its distribution (seeded), or its most likely one with ``greedy``.
    Why sampling by default: an early PPO policy's argmax is often one constant action whatever the game
    state, and then every evaluation scores the same return and retention is not measured at all."""
    from ray.rllib.core.columns import Columns

    logits = module.forward_inference({Columns.OBS: torch.as_tensor(obs[None])})[Columns.ACTION_DIST_INPUTS][0]
    if greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _act(module: MoEAgentModule | None, obs: np.ndarray, rng: np.random.Generator, num_actions: int,
         greedy: bool = False) -> int:
    return policy_action(module, obs, rng, greedy) if module is not None else int(rng.integers(num_actions))


def evaluate_game(module: MoEAgentModule | None, suite: str, game: str, episodes: int, seed: int,
                  detector: DetectorTrainer | None = None, true_index: int | None = None,
                  greedy: bool = False) -> dict[str, Any]:
    """Mean return over ``episodes`` of ``game``, played by ``module`` (sampled, or ``greedy``; None: a uniform random
    policy). With a detector, the module routes to the group of the game the detector names from each
    episode's first frame; ``detector_right`` is the share of episodes where that was ``true_index``."""
    env = make_env(suite, game, seed=seed)
    rng = np.random.default_rng(seed)
    returns, right = [], []
    counts: list[np.ndarray] = []  # per MoE layer: how often each expert was chosen
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        if module is not None and detector is not None:
            named = detector.predict(obs[None]).game
            right.append(named == true_index)
            module.set_active_game(named)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(_act(module, obs, rng, env.action_space.n, greedy))
            if module is not None:
                _count_experts(module, counts)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return {"return": float(np.mean(returns)), "detector_right": float(np.mean(right)) if right else None,
            "expert_counts": [c.tolist() for c in counts]}


def _count_experts(module: MoEAgentModule, counts: list[np.ndarray]) -> None:
    """Add the latest forward's routing choices (per MoE layer) to ``counts``."""
    for layer, stats in enumerate(module.last_moe_stats):
        chosen = stats.token_counts.detach().cpu().numpy()
        if layer == len(counts):
            counts.append(np.zeros_like(chosen))
        counts[layer] += chosen


def rollout_frames(module: MoEAgentModule, suite: str, game: str, count: int, seed: int) -> np.ndarray:
    """``count`` frames of ``game`` as the current policy plays it (new episodes as needed)."""
    env = make_env(suite, game, seed=seed)
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    obs, _ = env.reset(seed=seed)
    while len(frames) < count:
        frames.append(obs)
        obs, _, terminated, truncated, _ = env.step(_act(module, obs, rng, env.action_space.n))
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.stack(frames)


class RunGauges:
    """The iteration metrics as Ray metrics (``ray_aios_rl_*`` on the dashboard's metrics port), per game."""

    NAMES = ("episode_return_mean", "env_steps_per_sec", "learner_samples_per_sec", "moe_lb_loss",
             "detector_accuracy", "detector_loss")

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.gauges = {name: Gauge(f"aios_rl_{name}", description=f"sequential RL: {name}", tag_keys=("game",))
                       for name in self.NAMES}

    def update(self, game: str, values: dict[str, float | None]) -> None:
        for name, value in values.items():
            if name in self.gauges and value is not None:
                self.gauges[name].set(float(value), tags={"game": game})

    def update_specialisation(self, scores: dict[str, dict[str, float]]) -> None:
        """Per MoE layer: the game/expert mutual information and the random-router control, in bits."""
        if not hasattr(self, "mi"):
            from ray.util.metrics import Gauge

            self.mi = {key: Gauge(f"aios_rl_expert_{key}", description=f"sequential RL: game/expert {key} (bits)",
                                  tag_keys=("layer",)) for key in ("mi", "random_mi")}
        for layer, values in scores.items():
            for key, gauge in self.mi.items():
                gauge.set(float(values[key]), tags={"layer": str(layer)})


class SequentialRun:
    def __init__(self, cfg: RLConfig, store: StoreConfig | None = None, resume: bool = False) -> None:
        self.cfg, self.resume = cfg, resume
        self.games = validate_games(cfg.suite, cfg.games)
        self.game_ids = {g: i for i, g in enumerate(self.games)}
        self.groups = model_config(cfg, len(self.games))["groups"]  # impossible groups refused before any write
        self.run_dir = Path(cfg.run_dir or Path("artifacts/rl") / cfg.run_name).resolve()
        if resume:
            self.checkpoint = latest_checkpoint(self.run_dir)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise ConfigError(f"run directory {self.run_dir} already exists: choose another --run-name or --run-dir, "
                              f"or continue it with --resume {self.run_dir}")
        self.store = self._resolve_store(store or StoreConfig())
        self.phases = plan_phases(self.games, cfg.cycles)
        obs_space, _ = suite_spaces(cfg.suite)
        torch.manual_seed(cfg.seed)
        self.detector = DetectorTrainer(EnvironmentDetector(obs_space.shape, len(self.games)), seed=cfg.seed)
        self.switch_watch = SwitchWatch()
        self.state = ScheduleState()

    def run(self) -> dict[str, Any]:
        from aios_ray.train.ray_train import ensure_ray

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            atomic_write_json(self.run_dir / "rl_args.json", {**self.cfg.to_dict(),
                                                             "store": dataclasses.asdict(self.store)})
        self.log = MetricsLog(self.run_dir / "metrics.jsonl")
        ensure_ray(None)
        self.gauges = RunGauges()
        # A resumed run's store goes back to its checkpoint's snapshot as the learner opens it.
        algo = build_algo(self.cfg, self.games, self.store,
                          resume_snapshot=self.checkpoint.name if self.resume and self.store.tiered else None)
        try:
            self._start(algo)
            started, self.steps_at_start = time.perf_counter(), self._steps_done()
            for phase in self.phases[self.state.phase:]:
                self._announce(algo, phase)
                sync_bytes = switch_game(algo, self.cfg, phase)
                self._train_phase(algo, phase, started, sync_bytes)
                self._evaluate(algo, phase)
                self.state.phase, self.state.phase_steps = phase.index + 1, 0
                self._write_retention()
                save_checkpoint(self.run_dir, algo, self.detector, self.state, self._expert_backends(algo))
        finally:
            algo.stop()
            self.log.close()
            if self.store.tiered:
                self._end_store()
        return {"run_dir": str(self.run_dir), "games": self.games, "retention": self.state.retention,
                "random_scores": self.state.random_scores}

    def _start(self, algo: Any) -> None:
        """A new run scores the random policy; a resumed one restores its last checkpoint and drops the log
        lines of the steps after it (they run again), so the log holds each iteration once."""
        if not self.resume:
            self.state.random_scores = {
                g: evaluate_game(None, self.cfg.suite, g, self.cfg.eval_episodes, self.cfg.seed)["return"]
                for g in self.games}
            self.log.write("random_scores", step=0, **self.state.random_scores)
            return
        self.state = load_checkpoint(self.checkpoint, algo, self.detector)
        self.switch_watch = SwitchWatch(detected_after=list(self.state.detected_after))
        done = self._steps_done()
        dropped, last = self.log.rewind(done)
        reverted = [r for r in (b.reopened() for b in self._expert_backends(algo)) if r is not None]
        self.log.write("restart", step=done, checkpoint=str(self.checkpoint), lines_replaced=dropped,
                       last_logged_step=last, phase=self.state.phase, phase_steps=self.state.phase_steps,
                       **({"store_reverted_to": self.checkpoint.name, "store_cache": reverted[0]} if reverted else {}))
        say(f"rl  resumed from {self.checkpoint} at env step {done:,} (phase {self.state.phase + 1}, "
            f"{self.state.phase_steps:,} steps into it); {max(last - done, 0):,} logged steps run again")

    def _resolve_store(self, store: StoreConfig) -> StoreConfig:
        """The run's store: under the run directory, named after the run, capacities of 0 = every expert."""
        if not store.tiered:
            return store
        if self.cfg.dense:
            raise ConfigError("--experts tiered needs MoE layers (drop --dense)")
        total = self.cfg.num_experts * self.cfg.moe_layers
        resolved = store.resolved(self.run_dir, f"rl-{self.cfg.run_name}", total, use_gpu=False)
        group = len(self.groups[0]) * self.cfg.moe_layers
        say(f"rl  experts in the tiered store {resolved.path}: hot tier {resolved.capacity_gpu} of {total} "
            f"experts ({group} per game group)")
        return resolved

    def _end_store(self) -> None:
        """The store's actors (if the learner made them) end with the run; what was flushed stays on disk."""
        import ray

        if ray.is_initialized():
            from actors.tier_actors import shutdown_store

            shutdown_store(self.store)

    def _expert_backends(self, algo: Any) -> list[Any]:
        return list(_local_learner(algo).expert_backends.values())

    def _steps_done(self) -> int:
        return self.state.phase * self.cfg.steps_per_game + self.state.phase_steps

    def _train_phase(self, algo: Any, phase: Phase, started: float, sync_bytes: int) -> None:
        from ray.rllib.core import DEFAULT_MODULE_ID
        from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN, LEARNER_RESULTS

        from aios_ray.rl.learner import LB_METRIC

        total_steps = self.cfg.steps_per_game * len(self.phases)
        learner = _local_learner(algo)
        while self.state.phase_steps < self.cfg.steps_per_game:
            t0 = time.perf_counter()
            samples_before, seconds_before = learner.samples_trained()
            result = algo.train()
            samples, seconds = learner.samples_trained()
            learner_sps = (samples - samples_before) / max(seconds - seconds_before, 1e-9)
            self.state.iteration += 1
            self.state.phase_steps += self.cfg.train_batch_size  # what one iteration samples (train batch size)
            episode_return = result.get(ENV_RUNNER_RESULTS, {}).get(EPISODE_RETURN_MEAN)
            lb_loss = result.get(LEARNER_RESULTS, {}).get(DEFAULT_MODULE_ID, {}).get(LB_METRIC)
            detector = self._teach_detector(algo, phase)
            done = self._steps_done()
            sps = self.cfg.train_batch_size / (time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            eta = elapsed / max(done - self.steps_at_start, 1) * max(total_steps - done, 0)
            self.log.write("iteration", step=done, game=phase.game, phase=phase.index,
                           phase_steps=self.state.phase_steps, iteration=self.state.iteration,
                           episode_return_mean=episode_return, env_steps_per_sec=sps,
                           learner_samples_per_sec=learner_sps, sync_bytes=sync_bytes,
                           full_sync_bytes=_learner_module(algo).full_sync_nbytes(sync_bytes), moe_lb_loss=lb_loss,
                           **detector)
            self.gauges.update(phase.game, {"episode_return_mean": episode_return, "env_steps_per_sec": sps,
                                            "learner_samples_per_sec": learner_sps, "moe_lb_loss": lb_loss,
                                            **detector})
            ret = f"{episode_return:.2f}" if episode_return is not None else "n/a"
            say(f"rl  phase {phase.index + 1}/{len(self.phases)} {phase.game:<14} | steps "
                f"{self.state.phase_steps:,}/{self.cfg.steps_per_game:,} | return {ret} | {sps:,.0f} env steps/s | "
                f"detector {detector['detector_accuracy']:.2f} | ETA {format_seconds(eta)}")
            every = self.cfg.checkpoint_every
            if every and self.state.iteration % every == 0 and self.state.phase_steps < self.cfg.steps_per_game:
                self.state.detected_after = list(self.switch_watch.detected_after)
                save_checkpoint(self.run_dir, algo, self.detector, self.state, self._expert_backends(algo))

    def _teach_detector(self, algo: Any, phase: Phase) -> dict[str, float]:
        """Frames of the current game, played by the current policy, labelled with the game."""
        seed = self.cfg.seed + 1000 * (phase.index + 1) + self.detector.frames_seen
        frames = rollout_frames(_learner_module(algo), self.cfg.suite, phase.game, self.cfg.detector_frames, seed)
        predicted = self.detector.predict_each(frames)  # before it learns from them: what a switch would see
        for named in predicted:
            self.switch_watch.observe(phase.game_index, int(named))
        return self.detector.update(frames, np.full(len(frames), phase.game_index), minibatch=64, epochs=4)

    def _evaluate(self, algo: Any, phase: Phase) -> None:
        module = _learner_module(algo)
        row, right, usage = [], [], []
        for game in self.games:
            result = evaluate_game(module, self.cfg.suite, game, self.cfg.eval_episodes, self.cfg.seed + 7,
                                   detector=self.detector, true_index=self.game_ids[game],
                                   greedy=self.cfg.eval_greedy)
            row.append(result["return"])
            right.append(result["detector_right"])
            usage.append(result["expert_counts"])
        # per layer: a (games x experts) table of routing choices at this evaluation (empty for --dense)
        expert_counts = {str(layer): [per_game[layer] for per_game in usage] for layer in range(len(usage[0]))}
        module.set_active_game(phase.game_index)  # back to the game being trained
        self.state.retention.append(row)
        self.state.detected_after = list(self.switch_watch.detected_after)
        # Expert specialisation: the mutual information between game and chosen expert, beside a random router's.
        scores = {layer: {k: v[k] for k in ("mi", "random_mi")}
                  for layer, v in specialisation(expert_counts).items()} if expert_counts else {}
        self.log.write("phase_end", step=(phase.index + 1) * self.cfg.steps_per_game, game=phase.game,
                       phase=phase.index, returns=dict(zip(self.games, row, strict=True)),
                       detector_right=dict(zip(self.games, right, strict=True)), expert_counts=expert_counts,
                       specialisation=scores, detector_frames_to_detect=list(self.switch_watch.detected_after))
        self.gauges.update_specialisation(scores)
        self._log_store_stats(algo, phase)
        say(f"rl  after phase {phase.index + 1} ({phase.game}): " + ", ".join(
            f"{g} {r:.2f}" for g, r in zip(self.games, row, strict=True)))

    def _announce(self, algo: Any, phase: Phase) -> None:
        """Before a phase the learner's store prefetches the coming game's group into the hot tier (a no-op with
        local experts). The detector names the game from the new environment's first frame once it has seen
        that game; on a first visit it cannot, and the schedule, which knows the game, announces it."""
        frame, _ = make_env(self.cfg.suite, phase.game, seed=self.cfg.seed + phase.index).reset()
        seen = phase.game_index in self.detector.seen_per_game
        named = self.detector.predict(frame[None]).game if seen else phase.game_index
        group = self.groups[named]
        for backend in self._expert_backends(algo):
            backend.prefetch({layer: list(group) for layer in range(self.cfg.moe_layers)})
        self.log.write("switch", step=self._steps_done(), game=phase.game, announced=self.games[named],
                       announced_by="detector" if seen else "schedule", prefetched_group=list(group))

    def _log_store_stats(self, algo: Any, phase: Phase) -> None:
        """The tiered store's counters (demand hit rate, prefetch issued/used/wasted, streamed, stall), as the
        text trainer logs them: one ``store_stats`` line per phase."""
        if not self.store.tiered:
            return
        step = (phase.index + 1) * self.cfg.steps_per_game
        for backend in self._expert_backends(algo):
            stats = backend.stats(step)
            if stats is not None:
                self.log.write("store_stats", **{**stats, "step": step, "game": phase.game})

    def _write_retention(self) -> None:
        random_scores, retention = self.state.random_scores, self.state.retention
        phases = [f"{p.index + 1}:{p.game}" for p in self.phases[:len(retention)]]
        atomic_write_json(self.run_dir / "retention.json", {
            "games": self.games, "phases": phases, "matrix": retention, "random_scores": random_scores,
            "rows": "after phase i", "columns": "mean return on each game (detector-routed; "
                       + ("greedy" if self.cfg.eval_greedy else "actions sampled from the policy") + ")"})
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["after_phase", *self.games])
        for name, row in zip(phases, retention, strict=True):
            writer.writerow([name, *(f"{r:.4f}" for r in row)])
        writer.writerow(["random_policy", *(f"{random_scores[g]:.4f}" for g in self.games)])
        atomic_write_bytes(self.run_dir / "retention.csv", text.getvalue().encode("utf-8"))


def run_sequential(cfg: RLConfig, store: StoreConfig | None = None) -> dict[str, Any]:
    return SequentialRun(cfg, store).run()


def resume_sequential(run_dir: str) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest checkpoint, with the settings it was started with."""
    path = Path(run_dir)
    args = path / "rl_args.json"
    try:
        values = json.loads(args.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--resume {run_dir}: no rl_args.json (not a run of aios-ray rl sequential)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{args}: corrupt JSON ({exc})") from None
    store = StoreConfig(**values.pop("store", {}) or {})
    cfg = rl_config_from_dict({**values, "run_dir": str(path.resolve())}, source=str(args))
    return SequentialRun(cfg, store, resume=True).run()
