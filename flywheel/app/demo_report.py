"""The report of ``flywheel demo``: ``report.md`` (per cycle: data, reward model, policy, gate) and
``report.png`` (the same numbers as plots), written next to the run's ``summary.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(h: dict[str, Any] | None) -> str:
    return "—" if not h else f"{h['win_rate']:.3f} [{h['ci_low']:.3f}, {h['ci_high']:.3f}]"


def write_report(summary: dict[str, Any], run_dir: Path) -> Path:
    cfg = summary["config"]
    cycles = summary["cycles"]
    md: list[str] = [
        f"# flywheel demo — {cfg['scenario']}, seed {cfg['seed']}",
        "",
        f"{cfg['cycles']} cycle(s) of one simulated hour each; {cfg['honest_users']} honest users a cycle plus "
        f"{round(cfg['honest_users'] * cfg['adversary_share'] / (1 - cfg['adversary_share']))} adversaries "
        f"({cfg['adversary_share']:.0%} of all users); {cfg['eval_prompts']} held-out ShareGPT prompts at each gate. "
        f"Champion at the start: flywheel-policy v{summary['v1']} (SmolLM2-135M-Instruct). Run directory: "
        f"`{summary['run_dir']}`; total {summary['seconds']['total']:.0f} s.",
        "",
        f"Hidden preference (known only to the simulation and this report): `{summary['preference']}`.",
    ]
    if summary["rater"] != summary["preference"]:
        md.append(f"Users' clicks follow a different rule (the reward-hacking scenario): `{summary['rater']}`.")
    md += ["", "## Result", ""]
    fv = summary.get("final_vs_v1")
    if fv:
        md.append(f"**Final champion v{summary['final_champion']} vs v1 on the hidden preference: win rate "
                  f"{fv['win_rate']:.3f} (95% CI {fv['ci_low']:.3f}–{fv['ci_high']:.3f}) over {fv['prompts']} held-out "
                  f"prompts** (ties {fv['ties']:.1%}, counted half).")
    else:
        md.append(f"**No challenger was promoted; the champion is still v{summary['v1']}.** Why, cycle by cycle:")
        md.append("")
        for c in cycles:
            rm, pol = c["reward"], c["policy"]
            if rm.get("action") == "refuse":
                md.append(f"- cycle {c['number']}: reward model v{rm.get('version')} refused: {'; '.join(rm.get('reasons', []))}")
            if pol.get("trained"):
                md.append(f"- cycle {c['number']}: policy v{pol['version']} {pol['action']}: {'; '.join(pol['reasons'])}")
            elif rm.get("action") != "refuse":
                md.append(f"- cycle {c['number']}: policy not trained: {'; '.join(pol.get('reasons', []))}")
    md += ["", "## Cycles", "",
           "| cycle | events in | held back (ingest + curation) | pairs | agreement | RM | RM accuracy (eval / hidden pref.) "
           "| RM gate | policy | win rate vs champion, hidden pref. [95% CI] | judge win / LC | KL | length (tokens) "
           "| gate |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cycles:
        cur, rm, pol = c["curation"], c["reward"], c["policy"]
        agreement = cur.get("agreement") or {}
        agree = (f"{_f(agreement.get('percent_agreement'))} (α {_f(agreement.get('krippendorff_alpha'), 2)}, "
                 f"{agreement.get('items')} items)") if agreement.get("items") else "—"
        ch, cp = pol.get("challenger") or {}, pol.get("champion") or {}
        md.append(
            f"| {c['number']} | {cur.get('feedback_read', 0) + cur.get('held_at_ingest', 0)} feedback "
            f"({c['events_sent']} events) | {cur.get('held_at_ingest', 0)} + {cur.get('held_back', 0)} | {cur.get('pairs')} | "
            f"{agree} | v{rm.get('version')} | {_f(rm.get('metrics', {}).get('eval/accuracy'))} / "
            f"{_f(rm.get('hidden_preference_accuracy'))} | {rm.get('action', '—')} | "
            f"{'v' + str(pol['version']) if pol.get('trained') else '—'} | {_ci(pol.get('hidden_preference'))} | "
            f"{_f(ch.get('win_rate'))} / {_f(ch.get('lc_win_rate'))} | {_f(ch.get('kl'), 2)} | "
            f"{_f(ch.get('length_mean'), 1)} vs {_f(cp.get('length_mean'), 1)} | **{pol.get('action', '—')}** |")
    md += review_section(cycles)
    md += ["", "## Details per cycle", ""]
    for c in cycles:
        cur, rm, pol, flt = c["curation"], c["reward"], c["policy"], c["filters"]
        md += [f"### Cycle {c['number']} — [{c['start']}, {c['end']})", "",
               f"- served by: {', '.join(sorted(set(c['served_by']))) or '—'}"
               + (f"; after promotion: {pol['served_after']}" if pol.get("served_after") else ""),
               f"- answers the users rated: {c.get('answered_by') or '—'} ({cfg.get('model_samples', 0)} sampled answers "
               f"a prompt) beside ShareGPT's answer styles",
               f"- dataset `{cur.get('dataset')}`: {cur.get('feedback_read')} feedback events read, "
               f"{cur.get('held_at_ingest')} held at ingest, {cur.get('held_back')} held back by curation: "
               f"{cur.get('held_back_by_reason')}; pairs by source {cur.get('pairs_by_source')}; agreement "
               f"{cur.get('agreement')}",
               f"- filters against the simulation's truth: precision {_f(flt.get('precision'))}, recall "
               f"{_f(flt.get('recall'))}, honest feedback held back {_f(flt.get('honest_held_back_share'))}; recall by "
               f"kind {flt.get('recall_by_kind')}",
               f"- reward model v{rm.get('version')}: {', '.join(f'{k[5:]} {v:.3f}' for k, v in rm.get('metrics', {}).items())}; "
               f"accuracy against the hidden preference {_f(rm.get('hidden_preference_accuracy'))} on "
               f"{int(rm.get('hidden_preference_pairs') or 0)} eval pairs (the users' own labels agree with it on "
               f"{_f(rm.get('labels_agree_with_hidden_preference'))}); agreement with the trusted labelers' audit "
               f"pairs by rule: {', '.join(f'{k} {v:.3f}' for k, v in (rm.get('audit') or {}).items()) or '—'}; "
               f"gate **{rm.get('action')}**: {'; '.join(rm.get('reasons', []))}"]
        if pol.get("trained"):
            ch, cp = pol["challenger"] or {}, pol["champion"] or {}
            md += [f"- policy v{pol['version']} (PPO from `{pol['start_policy']}`, reward model v{pol['reward_model_version']}) "
                   f"vs champion v{pol.get('champion_version')}: hidden-preference win rate {_ci(pol.get('hidden_preference'))}; "
                   f"judge win rate {_f(ch.get('win_rate'))} (length-controlled {_f(ch.get('lc_win_rate'))}); judge reward "
                   f"{_f(ch.get('reward_mean'))} vs {_f(cp.get('reward_mean'))}; KL {_f(ch.get('kl'), 2)}; length "
                   f"{_f(ch.get('length_mean'), 1)} vs {_f(cp.get('length_mean'), 1)} tokens; never-ending "
                   f"{_f(ch.get('no_eos_share'))} vs {_f(cp.get('no_eos_share'))}; probes refused/answered "
                   f"{_f(ch.get('refusal_rate'))}/{_f(ch.get('helpful_rate'))} vs {_f(cp.get('refusal_rate'))}/"
                   f"{_f(cp.get('helpful_rate'))}",
                   f"- gate **{pol['action']}**: {'; '.join(pol['reasons'])}"]
            for ex in pol.get("examples", [])[:2]:
                md += [f"  - prompt: {ex['prompt']!r}", f"    - challenger: {ex['challenger']!r}",
                       f"    - champion: {ex['champion']!r}"]
        else:
            md.append(f"- policy: not trained — {'; '.join(pol.get('reasons', []))}")
        md.append(f"- seconds: {c['seconds']}")
        md.append("")
    png = run_dir / "report.png"
    _plot(summary, png)
    md += ["## Plots", "", "![report](report.png)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(md))
    return out


def review_section(cycles: list[dict[str, Any]]) -> list[str]:
    """Human review, cycle by cycle: what curation routed, what the simulated reviewers decided (through the
    HTTP endpoints), the filters' precision as review measured it, and the reviewers' agreement."""
    rows = [c for c in cycles if c.get("review")]
    if not rows:
        return []
    first = rows[0]["review"]["simulated"]
    md = ["", "## Human review", "",
          f"Simulated reviewers {', '.join(f'{k} (error rate {v:.0%})' for k, v in first['error_rates'].items())} "
          "worked each cycle's queue through `/v1/review`; their decisions went API -> Kafka -> lake as `review` "
          "events and the hour was curated again with them.", "",
          "| cycle | routed (correction / held back / uncertain) | two reviewers | reviewed | accepted | fixed | rejected "
          "| disputed | rejected by reason | filters' precision by review | Cohen's kappa | reviewers' wrong calls |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        rv = c["review"]
        by, out, fp = rv["routed_by_route"], rv["outcomes"], rv["filter_precision"]
        kappa = ", ".join(f"{k['reviewers'][0]}/{k['reviewers'][1]} {_f(k['kappa'], 2)} ({k['items']})" for k in rv["kappa"])
        md.append(f"| {c['number']} | {rv['routed']} ({by['correction']} / {by['held_back']} / {by['uncertain']}) | "
                  f"{rv['double']} | {rv['reviewed']} | {out['accept']} | {out['fix']} | {out['reject']} | "
                  f"{out['disputed']} | {rv['rejected_by_reason'] or '—'} | {_f(fp['precision'])} "
                  f"({fp['confirmed']}/{fp['reviewed']}) | {kappa or '—'} | {rv['simulated']['wrong_calls'] or 0} |")
    return md


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = summary["cycles"]
    xs = [c["number"] for c in cycles]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ax = axes[0]
    held = [c["curation"].get("held_at_ingest", 0) + c["curation"].get("held_back", 0) for c in cycles]
    kept = [c["curation"].get("feedback_read", 0) - c["curation"].get("held_back", 0) for c in cycles]
    ax.bar(xs, kept, label="kept")
    ax.bar(xs, held, bottom=kept, label="held back")
    ax.set_title("feedback events")
    ax.set_xlabel("cycle")
    ax.legend()
    ax = axes[1]
    ax.plot(xs, [c["reward"].get("metrics", {}).get("eval/accuracy") for c in cycles], "o-", label="eval labels")
    ax.plot(xs, [c["reward"].get("hidden_preference_accuracy") for c in cycles], "s-", label="hidden preference")
    ax.set_ylim(0, 1)
    ax.set_title("reward model accuracy")
    ax.set_xlabel("cycle")
    ax.legend()
    ax = axes[2]
    for key, label, marker in (("hidden", "hidden preference", "o"), ("judge", "judge (champion RM)", "s")):
        ys, lo, hi, xx = [], [], [], []
        for c in cycles:
            p = c["policy"]
            if not p.get("trained"):
                continue
            if key == "hidden" and p.get("hidden_preference"):
                h = p["hidden_preference"]
                ys.append(h["win_rate"])
                lo.append(h["win_rate"] - h["ci_low"])
                hi.append(h["ci_high"] - h["win_rate"])
            elif key == "judge":
                ys.append((p.get("challenger") or {}).get("win_rate"))
                lo.append(0)
                hi.append(0)
            else:
                continue
            xx.append(c["number"])
        if xx:
            ax.errorbar(xx, ys, yerr=[lo, hi], fmt=marker + "-", capsize=4, label=label)
    for c in cycles:
        p = c["policy"]
        ax.annotate(p.get("action", "skip"), (c["number"], 0.05), ha="center", fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_title("challenger vs champion win rate")
    ax.set_xlabel("cycle")
    if ax.get_legend_handles_labels()[0]:  # no policy trained (every reward model refused): nothing to label
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no policy was trained", ha="center", transform=ax.transAxes)
    ax = axes[3]
    lens = [(c["number"], (c["policy"].get("challenger") or {}).get("length_mean"),
             (c["policy"].get("champion") or {}).get("length_mean"), (c["policy"].get("challenger") or {}).get("kl"))
            for c in cycles if c["policy"].get("trained")]
    if lens:
        ax.plot([x[0] for x in lens], [x[1] for x in lens], "o-", label="challenger length")
        ax.plot([x[0] for x in lens], [x[2] for x in lens], "s--", label="champion length")
        ax2 = ax.twinx()
        ax2.bar([x[0] for x in lens], [x[3] for x in lens], alpha=0.25, color="red", width=0.2, label="KL")
        ax2.set_ylabel("challenger KL to its reference (bars)")
        ax.set_ylim(0, max(max(x[1] or 0, x[2] or 0) for x in lens) * 1.2)
    ax.set_title("response length (tokens) and KL")
    ax.set_xlabel("cycle")
    if lens:
        ax.legend(fontsize=8)
    for a in axes:
        a.set_xticks(xs)
        a.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    fv = summary.get("final_vs_v1")
    fig.suptitle(f"flywheel demo ({summary['config']['scenario']}): final champion vs v1 on the hidden preference "
                 + (f"{fv['win_rate']:.3f} [{fv['ci_low']:.3f}, {fv['ci_high']:.3f}]" if fv else "— no promotion"))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
