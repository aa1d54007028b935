"""Sequential multi-game reinforcement learning on RLlib: environments, agent, schedule."""
