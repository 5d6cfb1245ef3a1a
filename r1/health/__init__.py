"""GPU health: NVML sampled on every node (``monitor``), judged by a pure policy (``policy``), acted on by the
driver (``supervisor``), plus the driver's progress watchdog (``watchdog``). docs/sre.md is the operator's view."""
