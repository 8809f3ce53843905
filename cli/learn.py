"""CLI of learning together: `knexa-node learn --data FILE` and `knexa-node rounds [--explain]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _sent(record: dict) -> str:
    answered = record.get("answered", record["sent"])
    sent = f"sent {answered} answer{'' if answered == 1 else 's'}"
    if answered == record["sent"]:
        return sent
    return f"{sent} ({record['sent'] - answered} of {record['sent']} prompts left unanswered)"


def _short(peer: str) -> str:
    return peer[:6] + "…" + peer[-6:] if len(peer) > 14 else peer


def print_learn(console: Any, status: dict[str, Any]) -> None:
    accuracy = status.get("accuracy")
    examples = status["examples"]
    shared = examples.get("shared_validation", 0)
    console.print(f"phase: {status['phase']}  adapter: {status['adapter']}  examples: "
                  f"{examples['train']} train / {examples['validation']} validation"
                  + (f" (+ {shared} shared)" if shared else ""), highlight=False)
    if accuracy is not None:
        skills = ", ".join(f"{k} {v:.2f}" for k, v in sorted(status["skills"].items()))
        console.print(f"validation accuracy: {accuracy:.3f}  skills: {skills or '-'}", highlight=False)
    local = status.get("local_training")
    if local:
        console.print(f"local training: {local['training']['steps']} steps, loss {local['training']['first_loss']:.3f}"
                      f" -> {local['training']['last_loss']:.3f}; validation {local['accuracy_before']:.3f} -> "
                      f"{local['accuracy_after']:.3f} (loss {local['loss_before']:.3f} -> {local['loss_after']:.3f}): "
                      f"{'kept' if local['swapped'] else 'not better, discarded'}",
                      highlight=False)
    if status.get("rejoined_after_restart"):
        console.print("rejoined the rounds after a restart (saved adapter evaluated again, no local training)",
                      highlight=False)
    role = status.get("role")
    where = f"round {status['round']}" + (f", {role['role']} ({_short(role['teacher'])} -> {_short(role['student'])})"
                                          if role else "")
    console.print(f"members: {len(status['members'])}  {where}", highlight=False)
    if status.get("states_checked"):
        console.print(f"matchmaker states checked against the rewards they learned from: {status['states_checked']}",
                      highlight=False)
    if status.get("rejected"):
        console.print("refused: " + ", ".join(f"{reason} ({n})" for reason, n in sorted(status["rejected"].items())),
                      highlight=False)
    if status.get("last_error"):
        console.print(f"last error: {status['last_error']}", highlight=False)


def print_rounds(console: Any, view: dict[str, Any], explain: bool) -> None:
    table = Table(title="distillation rounds (shared matchmaker state)", title_justify="left")
    for column in ("round", "matchmaker", "teacher -> student", "score (mean + width)", "accuracy gain",
                   "loss drop", "reward"):
        table.add_column(column)
    records = list(view["history"])
    if view.get("open"):
        records.append({**view["open"], "rewards": None})
    for record in records:
        rewards = {r[0]: r for r in record["rewards"]} if record["rewards"] is not None else {}
        for i, pair in enumerate(record["pairs"] or [{}]):
            reward = rewards.get(pair.get("student", ""))
            gain = f"{reward[1]:+.3f}" if reward else ("open" if record["rewards"] is None else "-")
            table.add_row(
                str(record["round"]) if i == 0 else "", _short(record["matchmaker"]) if i == 0 else "",
                f"{_short(pair['teacher'])} -> {_short(pair['student'])}" if pair else "(no pairs)",
                f"{pair['mean']:+.3f} + {pair['width']:.3f}" if pair else "",
                gain, f"{reward[2]:+.4f}" if reward else "", f"{reward[3]:+.3f}" if reward else "",
            )
    console.print(table)
    if view["this_node"]:
        mine = Table(title="this node", title_justify="left")
        for column in ("round", "role", "partner", "detail"):
            mine.add_column(column)
        for r in view["this_node"]:
            detail = (f"gain {r['gain']:+.3f}, loss drop {r['loss_drop']:+.4f}, "
                      f"{'kept' if r['swapped'] else 'discarded'}" if "gain" in r
                      else r.get("error") or (_sent(r) if "sent" in r else "under way"))
            mine.add_row(str(r["round"]), r["role"], _short(r["partner"]), detail)
        console.print(mine)
    if explain:
        scores = Table(title=f"LinUCB scores for round {view['round'] + 1} (upper confidence bound = mean + width)",
                       title_justify="left")
        for column in ("teacher -> student", "teacher leads in", "mean", "width (uncertainty)", "ucb"):
            scores.add_column(column)
        for row in view.get("explain", []):
            lead = ", ".join(f"{c} +{v:.2f}" for c, v in sorted(row.get("lead", {}).items(), key=lambda kv: -kv[1]))
            scores.add_row(f"{_short(row['teacher'])} -> {_short(row['student'])}", lead or "-",
                           f"{row['mean']:+.4f}", f"{row['width']:.4f}", f"{row['ucb']:+.4f}")
        console.print(scores)


def learn_body(data: Path, wait: bool) -> dict[str, Any]:
    return {"data": str(data.expanduser().resolve()), "wait": wait}
