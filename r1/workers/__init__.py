"""Ray actors wrapping the engines, and the two pools (training, rollout) in their own placement groups."""
