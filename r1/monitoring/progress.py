"""The live line a person watches: step, reward, accuracy, tokens/s, ETA (rich, one line per step)."""

from __future__ import annotations

import math
import time

from rich.console import Console


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0):
        self.console = Console(highlight=False, soft_wrap=True)
        self.total, self.start_step = total_steps, start_step
        self.t0 = time.time()

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.time() - self.t0) / done * (self.total - step)

    def eta_text(self, step: int) -> str:
        eta = self.eta_s(step)
        return f"{int(eta // 60)}m{int(eta % 60):02d}s" if not math.isnan(eta) else "?"

    def step(self, step: int, m: dict) -> None:
        eta_txt = self.eta_text(step)
        self.console.print(
            f"[bold]step {step}/{self.total}[/] reward {m['reward/mean']:.3f} "
            f"acc {m.get('reward/accuracy', float('nan')):.3f} fmt {m.get('reward/format', float('nan')):.3f} "
            f"len {m['response/length_mean']:.0f} kl {m.get('train/kl', 0.0):.4f} "
            f"gen {m['perf/gen_tokens_per_s']:.0f} tok/s train {m['perf/train_tokens_per_s']:.0f} tok/s "
            f"step {m['time/step_s']:.1f}s" + (
                f" stale {m['staleness/mean']:.1f} overlap {m['perf/overlap_efficiency']:.2f}"
                if m.get("staleness/max", 0) > 0 else "") + f" ETA {eta_txt}"
        )

    def sft_step(self, step: int, m: dict) -> None:
        self.console.print(
            f"[bold]step {step}/{self.total}[/] nll {m['train/nll']:.4f} grad {m['train/grad_norm']:.2f} "
            f"len {m['sft/response_length_mean']:.0f} train {m['perf/train_tokens_per_s']:.0f} tok/s "
            f"step {m['time/step_s']:.1f}s ETA {self.eta_text(step)}")

    def note(self, text: str) -> None:
        self.console.print(text)
