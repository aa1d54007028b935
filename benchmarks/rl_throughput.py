"""Env steps/s of the project's RLlib PPO (MoE agent, and its ``--dense`` baseline) over a CleanRL-style PPO.

What is measured, and why: what RLlib and the MoE agent cost a PPO iteration on real Atari, against the
smallest honest PPO one can write for the same job. Both sides play ALE Pong through the project's
``make_env("atari", "Pong")`` (84x84x4 uint8 channels-last, frame skip 4 with max-pool, v5 sticky actions,
the full 18 actions), so the emulator work per env step is identical, and both run in this one process:

* ``moe`` / ``dense``: ``aios_ray.rl.sequential.build_algo`` on an ``RLConfig`` (suite atari, games Pong,
  ``num_envs_per_env_runner=8``, ``rollout_length=128``, ``num_epochs=4``, ``minibatch_size=256``, the
  rest at their defaults: hidden 128, 8 experts top-2 of expert width 128, one MoE block, groups routing;
  ``dense=True`` for the baseline with equal active parameters). One iteration is one ``algo.train()``:
  RLlib samples 8 x 128 = 1,024 env steps and runs the PPO update (GAE in the learner connector,
  4 epochs of minibatches of 256, Adam) and syncs the weights.
  ``num_env_runners=0`` (default, ``--num-env-runners``): the env runner is the driver's local one, so
  sampling and learning run in this process, as in the CleanRL script. On 2 cores a remote env runner
  would not overlap anything (RLlib's PPO samples, then learns, then syncs: synchronous) and would add a
  Ray round trip for the episodes (~28 MB of frames per iteration) and the weights each iteration.
* ``cleanrl``: a single-process PPO written here in the style of CleanRL's ``ppo_atari.py``: the Nature CNN
  (the project's ``NatureCNN`` layers, CleanRL's orthogonal init) with the agent's feature width
  (``--baseline-hidden``, default the RLConfig's 128; CleanRL's own script uses 512), ``gym.vector.
  SyncVectorEnv`` over 8 ``make_env`` envs (same-step autoreset, as CleanRL's gym version), 128-step
  rollouts under ``torch.no_grad``, GAE (gamma 0.99, lambda 0.95), 4 epochs over 4 shuffled minibatches of
  256, clipped policy and value objectives with entropy bonus, normalised advantages, gradient clipping
  0.5, Adam (lr 2.5e-4, eps 1e-5; the lr annealing is left out: it costs nothing).

Each is timed over whole iterations (sampling + update): env steps / wall seconds. The rounds run
``moe, cleanrl, dense, cleanrl`` (``A B A B``) after ``--warmup`` untimed rounds; each project iteration
is paired with the CleanRL iteration right after it, and ``rl_sps_ratio`` is the median over pairs of
``sps(moe) / sps(cleanrl)`` (``rl_sps_ratio_dense`` likewise). The bar of issue 8: ``rl_sps_ratio >= 0.5``
(aim 0.7). Torch uses ``--threads`` intra-op threads (default: the machine's cores) for all variants.

Then (unless ``--no-profile``) one more iteration of each variant runs with timers around the parts of an
iteration: for RLlib the env runner's env step, env-to-module and module-to-env connectors, module forward
and the rest of ``sample()`` (episode bookkeeping, callbacks, metrics); the learner connector (GAE with its
value forward pass over the whole batch), ``forward_train``, loss, backward, gradient clip + Adam and the
rest of ``update()``; the weight sync and the rest of ``train()``; the FFN blocks' forward (MoE or dense)
inside the module forwards. The CleanRL iteration is split the same way (env step, policy, GAE, update).
A last check times one forward + backward of the encoder, the MoE block and the dense block on a
minibatch of 256.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/rl_throughput.py [--pairs 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from aios_ray.rl.config import RLConfig  # noqa: E402
from aios_ray.rl.envs import make_env  # noqa: E402
from aios_ray.rl.module import AgentConfig, FFNBlock, NatureCNN  # noqa: E402

SUITE, GAME = "atari", "Pong"
NUM_ENVS, ROLLOUT, EPOCHS, MINIBATCH = 8, 128, 4, 256


# ---------------------------------------------------------------------------------------------------------------------
# Timers


class Timers:
    """Wall seconds and call counts per label; nested labels are all counted (parts are reported as such)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def time(self, label: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] += time.perf_counter() - started
            self.calls[label] += 1

    def wrap(self, obj: Any, method: str, label: str) -> None:
        """Times ``obj.method`` (an instance attribute shadowing the class's method)."""
        original: Callable[..., Any] = getattr(obj, method)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.time(label):
                return original(*args, **kwargs)

        setattr(obj, method, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class TimedCall:
    """Stands in for a callable object (an RLlib connector pipeline): calls are timed, attributes delegated."""

    def __init__(self, inner: Any, timers: Timers, label: str) -> None:
        self._inner, self._timers, self._label = inner, timers, label

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._timers.time(self._label):
            return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ---------------------------------------------------------------------------------------------------------------------
# The CleanRL-style PPO


def layer_init(layer: nn.Module, std: float = 2**0.5, bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class CleanRLAgent(nn.Module):
    """CleanRL's ``ppo_atari`` agent: Nature CNN -> actor and critic heads, orthogonal init."""

    def __init__(self, num_actions: int, hidden: int) -> None:
        super().__init__()
        self.encoder = NatureCNN(4, hidden)  # (B, 84, 84, 4) uint8 -> permute, / 255, 3 convs, linear, ReLU
        for layer in self.encoder.net:
            if isinstance(layer, nn.Conv2d | nn.Linear):
                layer_init(layer)
        self.actor = layer_init(nn.Linear(hidden, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(hidden, 1), std=1.0)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.encoder(obs))

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        hidden = self.encoder(obs)
        probs = torch.distributions.Categorical(logits=self.actor(hidden))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)


class CleanRLPPO:
    """One process, 8 synchronous envs, rollouts of 128 steps, GAE, 4 epochs x 4 minibatches, Adam."""

    gamma, gae_lambda, clip_coef, ent_coef, vf_coef, max_grad_norm = 0.99, 0.95, 0.1, 0.01, 0.5, 0.5

    def __init__(self, seed: int, hidden: int) -> None:
        self.envs = gym.vector.SyncVectorEnv(
            [functools.partial(make_env, SUITE, GAME, seed + i) for i in range(NUM_ENVS)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        torch.manual_seed(seed)
        self.agent = CleanRLAgent(int(self.envs.single_action_space.n), hidden)
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=2.5e-4, eps=1e-5)
        shape = (ROLLOUT, NUM_ENVS)
        self.obs = torch.zeros(shape + self.envs.single_observation_space.shape, dtype=torch.uint8)
        self.actions = torch.zeros(shape, dtype=torch.long)
        self.logprobs, self.rewards, self.dones, self.values = (torch.zeros(shape) for _ in range(4))
        next_obs, _ = self.envs.reset(seed=seed)
        self.next_obs = torch.as_tensor(next_obs)
        self.next_done = torch.zeros(NUM_ENVS)
        self.rng = np.random.default_rng(seed)
        self.timers = Timers()
        self.episode_returns: list[float] = []

    def iteration(self) -> int:
        """One rollout + update; returns the env steps it sampled."""
        t = self.timers
        for step in range(ROLLOUT):
            self.obs[step] = self.next_obs
            self.dones[step] = self.next_done
            with t.time("policy"), torch.no_grad():
                action, logprob, _, value = self.agent.get_action_and_value(self.next_obs)
            self.values[step] = value.flatten()
            self.actions[step] = action
            self.logprobs[step] = logprob
            with t.time("env_step"):
                next_obs, reward, terminated, truncated, _ = self.envs.step(action.numpy())
            self.rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
            self.next_obs = torch.as_tensor(next_obs)
            self.next_done = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
        with t.time("gae"), torch.no_grad():
            next_value = self.agent.get_value(self.next_obs).reshape(1, -1)
            advantages = torch.zeros_like(self.rewards)
            lastgaelam = torch.zeros(NUM_ENVS)
            for step in reversed(range(ROLLOUT)):
                if step == ROLLOUT - 1:
                    nextnonterminal, nextvalues = 1.0 - self.next_done, next_value
                else:
                    nextnonterminal, nextvalues = 1.0 - self.dones[step + 1], self.values[step + 1]
                delta = self.rewards[step] + self.gamma * nextvalues * nextnonterminal - self.values[step]
                lastgaelam = delta + self.gamma * self.gae_lambda * nextnonterminal * lastgaelam
                advantages[step] = lastgaelam
            returns = advantages + self.values
        with t.time("update"):
            self._update(advantages, returns)
        return ROLLOUT * NUM_ENVS

    def _update(self, advantages: torch.Tensor, returns: torch.Tensor) -> None:
        b_obs = self.obs.reshape((-1,) + self.obs.shape[2:])
        b_logprobs, b_actions = self.logprobs.reshape(-1), self.actions.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), self.values.reshape(-1)
        batch = ROLLOUT * NUM_ENVS
        for _ in range(EPOCHS):
            order = self.rng.permutation(batch)
            for start in range(0, batch, MINIBATCH):
                mb = torch.as_tensor(order[start:start + MINIBATCH])
                _, newlogprob, entropy, newvalue = self.agent.get_action_and_value(b_obs[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                mb_adv = b_advantages[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio,
                                    -mb_adv * torch.clamp(ratio, 1 - self.clip_coef, 1 + self.clip_coef)).mean()
                newvalue = newvalue.view(-1)
                v_unclipped = (newvalue - b_returns[mb]) ** 2
                v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -self.clip_coef, self.clip_coef)
                v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()
                loss = pg_loss - self.ent_coef * entropy.mean() + v_loss * self.vf_coef
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.agent.parameters(), self.max_grad_norm)
                self.optimizer.step()

    def close(self) -> None:
        self.envs.close()


# ---------------------------------------------------------------------------------------------------------------------
# The project's RLlib PPO


class ProjectPPO:
    """``build_algo`` on the benchmark's RLConfig; one iteration = one ``algo.train()``."""

    def __init__(self, name: str, args: argparse.Namespace, dense: bool) -> None:
        from aios_ray.rl.sequential import build_algo

        self.name = name
        self.cfg = RLConfig(suite=SUITE, games=GAME, num_env_runners=args.num_env_runners,
                            num_envs_per_env_runner=NUM_ENVS, rollout_length=ROLLOUT, num_epochs=EPOCHS,
                            minibatch_size=MINIBATCH, dense=dense, seed=args.seed)
        self.algo = build_algo(self.cfg, [GAME])
        self.timers = Timers()
        self.optimizer_steps = 0
        self.last_result: dict[str, Any] = {}

    def iteration(self) -> int:
        from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED

        self.last_result = self.algo.train()
        return int(self.last_result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED])

    def instrument(self) -> None:
        """Timers around the parts of an iteration (local env runner and local learner only)."""
        t, algo = self.timers, self.algo
        t.wrap(algo, "training_step", "train.training_step")
        t.wrap(algo.env_runner_group, "sync_weights", "sync_weights")
        t.wrap(algo.learner_group, "update", "learner.update")
        runner = algo.env_runner
        if runner is not None and algo.config.num_env_runners == 0:
            t.wrap(runner, "sample", "sample")
            t.wrap(runner, "_try_env_step", "sample.env_step")
            t.wrap(runner.module, "forward_exploration", "sample.module_forward")
            runner._env_to_module = TimedCall(runner._env_to_module, t, "sample.env_to_module")
            runner._module_to_env = TimedCall(runner._module_to_env, t, "sample.module_to_env")
            self._wrap_ffn(runner.module, "sample.module_forward.ffn")
        learner = algo.learner_group._learner
        learner._learner_connector = TimedCall(learner._learner_connector, t, "learner.connector")
        t.wrap(learner.module, "forward_train", "learner.forward_train")
        t.wrap(learner, "compute_losses", "learner.loss")
        t.wrap(learner, "compute_gradients", "learner.backward")
        t.wrap(learner, "postprocess_gradients", "learner.clip_and_adam")
        t.wrap(learner, "apply_gradients", "learner.clip_and_adam")
        for module in learner.module.values():
            self._wrap_ffn(module, "learner.ffn_forward")

    def _wrap_ffn(self, module: Any, label: str) -> None:
        agent = module.unwrapped() if hasattr(module, "unwrapped") else module
        for block in getattr(agent, "blocks", []):
            self.timers.wrap(block.ffn, "forward", label)

    def stop(self) -> None:
        self.algo.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def report_project(variant: ProjectPPO, wall: float) -> None:
    s, c = variant.timers.seconds, variant.timers.calls
    sample, update = s.get("sample", 0.0), s.get("learner.update", 0.0)
    sample_parts = ["sample.env_step", "sample.env_to_module", "sample.module_forward", "sample.module_to_env"]
    update_parts = ["learner.connector", "learner.forward_train", "learner.loss", "learner.backward",
                    "learner.clip_and_adam"]
    rows: list[tuple[str, float]] = []
    if "sample" in s:  # the local env runner samples (num_env_runners=0); a remote one is not instrumented
        rows.append(("sample()", sample))
        rows += [(f"  {k.split('.', 1)[1]}", s.get(k, 0.0)) for k in sample_parts]
        rows.append(("  rest (episodes, callbacks, metrics)", sample - sum(s.get(k, 0.0) for k in sample_parts)))
    rows.append(("learner_group.update()", update))
    rows += [(f"  {k.split('.', 1)[1]}", s.get(k, 0.0)) for k in update_parts]
    rows.append(("  rest (minibatching, metrics)", update - sum(s.get(k, 0.0) for k in update_parts)))
    rows.append(("sync_weights()", s.get("sync_weights", 0.0)))
    rest = "rest of train() (results, metrics)" if "sample" in s else "rest of train() (remote sampling, results)"
    rows.append((rest, wall - sample - update - s.get("sync_weights", 0.0)))
    print(f"profile {variant.name}: one train() {wall:.2f} s (timers on); optimizer steps "
          f"{c.get('learner.backward', 0)}, env steps {c.get('sample.env_step', 0)} vector steps")
    for label, secs in rows:
        print(f"  {label:<38} {secs * 1e3:8.1f} ms  {100 * secs / wall:5.1f}%")
    ffn_fwd = s.get("sample.module_forward.ffn", 0.0) + s.get("learner.ffn_forward", 0.0)
    print(f"  (inside the module forwards: FFN block forward {ffn_fwd * 1e3:.1f} ms = {100 * ffn_fwd / wall:.1f}%; "
          f"env runner {s.get('sample.module_forward.ffn', 0.0) * 1e3:.1f} ms, learner "
          f"{s.get('learner.ffn_forward', 0.0) * 1e3:.1f} ms incl. the connector's value pass)")


def report_cleanrl(variant: CleanRLPPO, wall: float) -> None:
    s = variant.timers.seconds
    print(f"profile cleanrl: one iteration {wall:.2f} s")
    rest = wall - sum(s.values())
    for label, secs in [("env_step", s["env_step"]), ("policy forward", s["policy"]), ("gae", s["gae"]),
                        ("update (4 epochs x 4 minibatches)", s["update"]), ("rest (buffers)", rest)]:
        print(f"  {label:<38} {secs * 1e3:8.1f} ms  {100 * secs / wall:5.1f}%")


def time_fwd_bwd(fn: Callable[[], torch.Tensor], reps: int = 5) -> float:
    times = []
    for _ in range(reps + 1):
        started = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def layer_check() -> None:
    """Forward + backward of the encoder and one FFN block (MoE and dense) on a minibatch of 256."""
    obs = torch.randint(0, 256, (MINIBATCH, 84, 84, 4), dtype=torch.uint8)
    x = torch.randn(MINIBATCH, 128, requires_grad=True)
    encoder = NatureCNN(4, 128)
    moe_cfg = AgentConfig(groups=((0, 1, 2, 3),))
    moe = FFNBlock(moe_cfg)
    moe.ffn.restrict_to([0, 1, 2, 3])
    dense = FFNBlock(AgentConfig(dense=True))
    enc = time_fwd_bwd(lambda: encoder(obs))
    t_moe = time_fwd_bwd(lambda: moe(x)[0])
    t_dense = time_fwd_bwd(lambda: dense(x)[0])
    print(f"layer check fwd+bwd N={MINIBATCH}: Nature CNN {enc * 1e3:.1f} ms, MoE block {t_moe * 1e3:.1f} ms, "
          f"dense block {t_dense * 1e3:.1f} ms")


# ---------------------------------------------------------------------------------------------------------------------


def timed(variant: Any) -> tuple[float, int]:
    started = time.perf_counter()
    steps = variant.iteration()
    return time.perf_counter() - started, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="timed rounds (each: moe, cleanrl, dense, cleanrl)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--variants", default="moe,dense", help="project variants to pair with CleanRL")
    parser.add_argument("--num-env-runners", type=int, default=0, help="RLConfig.num_env_runners (0: the driver)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (all)")
    parser.add_argument("--baseline-hidden", type=int, default=128,
                        help="CleanRL agent's feature width (the project's RLConfig.hidden is 128; CleanRL: 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", action="store_true", help="skip the instrumented iterations")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"moe", "dense"}:
        parser.error("--variants: a comma-separated subset of moe,dense")

    import ale_py
    import ray

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} nproc={os.cpu_count()} torch threads={torch.get_num_threads()} "
          f"torch {torch.__version__} ray {ray.__version__} gymnasium {gym.__version__} ale-py {ale_py.__version__} "
          f"python {platform.python_version()} load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"workload: ALE {GAME} via make_env('{SUITE}', '{GAME}'), {NUM_ENVS} envs x {ROLLOUT} steps = "
          f"{NUM_ENVS * ROLLOUT} env steps per iteration, {EPOCHS} epochs, minibatch {MINIBATCH}; RLlib "
          f"num_env_runners={args.num_env_runners} num_learners=0; CleanRL-style hidden={args.baseline_hidden}",
          flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2)
    project = {name: ProjectPPO(name, args, dense=name == "dense") for name in variants}
    cleanrl = CleanRLPPO(args.seed, args.baseline_hidden)
    try:
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        sps: dict[str, list[float]] = defaultdict(list)
        for i in range(args.warmup + args.pairs):
            warm = i < args.warmup
            parts = []
            for name in variants:
                t_p, n_p = timed(project[name])
                t_c, n_c = timed(cleanrl)
                s_p, s_c = n_p / t_p, n_c / t_c
                parts.append(f"{name} {t_p:.2f} s ({s_p:.0f} sps) / cleanrl {t_c:.2f} s ({s_c:.0f} sps) = "
                             f"{s_p / s_c:.3f}")
                if not warm:
                    ratios[name].append(s_p / s_c)
                    sps[name].append(s_p)
                    sps["cleanrl"].append(s_c)
            print(f"round {i + 1}/{args.warmup + args.pairs}{' (warm-up)' if warm else ''}: " + "; ".join(parts)
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)
        for name in ["cleanrl", *variants]:
            print(f"sps {name:<8} median {statistics.median(sps[name]):7.0f}  max {max(sps[name]):7.0f}")
        for name in variants:
            key = "rl_sps_ratio" if name == "moe" else "rl_sps_ratio_dense"
            print(f"{key}={statistics.median(ratios[name]):.3f}")
            print(f"({name}: per-pair ratios {', '.join(f'{r:.3f}' for r in ratios[name])}; bar >= 0.5, aim 0.7)")

        if not args.no_profile:
            for name in variants:
                project[name].instrument()
                t_p, _ = timed(project[name])
                report_project(project[name], t_p)
            cleanrl.timers.reset()
            t_c, _ = timed(cleanrl)
            report_cleanrl(cleanrl, t_c)
            layer_check()
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        cleanrl.close()
        for variant in project.values():
            variant.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
