"""The dataset card: Markdown with PNG plots (label balance, lengths, sources, filter reasons)."""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_META = {"Software": None}  # no version string in the PNG: the same data gives the same bytes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata=_META)
    plt.close(fig)
    return buf.getvalue()


def _bar(title: str, counts: dict[str, int], xlabel: str = "") -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(counts) or ["(none)"]
    ax.barh(names, [counts.get(n, 0) for n in names], color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel(xlabel or "rows")
    fig.tight_layout()
    return _png(fig)


def render_card(ds: Any, manifest: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    plots: dict[str, bytes] = {}
    plots["sources.png"] = _bar("Pairs by source", manifest["pairs_by_source"])
    plots["filter_reasons.png"] = _bar("Feedback held back, by reason",
                                       {k: v for k, v in manifest["held_back_by_reason"].items()}, "events")
    balance = {f"pairs {k}": v for k, v in manifest["pairs_by_split"].items()}
    balance.update({f"unpaired label={k}": v for k, v in manifest["unpaired_by_label"].items()})
    plots["label_balance.png"] = _bar("Label balance", balance)
    fig, ax = plt.subplots(figsize=(6, 3))
    if len(ds.pairs):
        ax.hist([ds.pairs["chosen"].str.len(), ds.pairs["rejected"].str.len()], bins=30, label=["chosen", "rejected"])
        ax.legend()
    ax.set_title("Response length (characters)")
    fig.tight_layout()
    plots["lengths.png"] = _png(fig)

    agr = manifest["agreement"]
    lines = [
        f"# Preference dataset {manifest['version']}",
        "",
        f"Interval `{manifest['interval']['start']}` to `{manifest['interval']['end']}` of the lake `{manifest['lake']}`"
        f" ({manifest['lake_files_read']} files in {len(manifest['lake_partitions_read'])} partitions); "
        f"code `{manifest['code_version']}`.",
        "",
        "## Contents",
        "",
        "| table | rows | what |",
        "|---|---|---|",
        f"| pairs.parquet | {manifest['files']['pairs.parquet']['rows']} | `pair_id, prompt, chosen, rejected, source, margin, group_id, split, event_ids` (reward model, DPO) |",
        f"| unpaired.parquet | {manifest['files']['unpaired.parquet']['rows']} | `prompt, completion, label, source, group_id, split, event_ids` (KTO) |",
        f"| prompts.parquet | {manifest['files']['prompts.parquet']['rows']} | deduplicated prompts with near-duplicate `group_id` and `split` (PPO) |",
        f"| quarantine.parquet | {manifest['files']['quarantine.parquet']['rows']} | feedback held back: `event_id, reason, type, user_id, occurred_at` |",
        "",
        "`margin` is the winning side's vote share (0.5 < margin <= 1). The split is by near-duplicate prompt "
        "group, so no prompt is in both train and eval. Emails, phone and card numbers are masked.",
        "",
        "## Numbers",
        "",
        "```json",
        json.dumps({k: manifest[k] for k in ("events_read", "held_back_by_reason", "pairs_by_source", "pairs_by_split",
                                             "ties_dropped", "agreement", "unpaired_by_label", "prompts",
                                             "prompt_groups", "pii_masked")}, indent=2),
        "```",
        "",
        f"Rater agreement over {agr['items']} multiply-rated comparisons: {agr['percent_agreement']} percent "
        f"agreement, Krippendorff's alpha {agr['krippendorff_alpha']}. Agreement bounds the accuracy a reward model "
        "can reach on these labels.",
        "",
        *_review_section(manifest.get("review")),
        "## Plots",
        "",
        *[f"![{name}](plots/{name})" for name in plots],
        "",
    ]
    return "\n".join(lines), plots


def _review_section(review: dict[str, Any] | None) -> list[str]:
    """Human review: what was routed and decided, the filters' precision as reviewers measured it, and the
    reviewers' own numbers (Cohen's kappa per pair of reviewers on the items both decided)."""
    if not review:
        return []
    fp = review["filter_precision"]
    precision = "not measured yet (no held-back item reviewed)" if fp["precision"] is None else \
        f"{fp['precision']:.3f} ({fp['confirmed']} of {fp['reviewed']} reviewed held-back events confirmed)"
    lines = ["## Human review", "",
             f"{review['routed']} items routed to review {review['routed_by_route']} ({review['double']} for two "
             f"reviewers); {review['reviewed']} decided {review['outcomes']}; rejected by reason "
             f"{review['rejected_by_reason'] or '{}'}; {review['reviewed_pairs']} pairs come from reviewed feedback.",
             "", f"Filters' precision measured by review: {precision}.", ""]
    if review["reviewers"]:
        lines += ["| reviewer | decided | acceptance rate | per hour |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['decided']} | {r['acceptance_rate']} | {r['per_hour']} |"
                  for name, r in review["reviewers"].items()]
        lines.append("")
    for k in review["kappa"]:
        lines.append(f"- Cohen's kappa {k['reviewers'][0]} / {k['reviewers'][1]}: {k['kappa']} on {k['items']} items "
                     f"(agreement {k['agreement']})")
    return [*lines, ""] if review["kappa"] else lines
