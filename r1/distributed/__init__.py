"""Process groups that span pools: bucketed weight broadcast from the trainer to every rollout worker."""
