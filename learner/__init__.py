"""The learner role: double-DQN loss, optimizer, target sync, weight publishing, checkpoints."""
