"""The curation report: an HTML page of examples with every response token coloured by its score, a histogram of
the scores (PNG) and a summary (JSON). Written into a temporary folder and renamed when complete."""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from tokensieve.files import replace_atomically

HTML_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>tokensieve curation: {scorer}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.example {{ border-top: 1px solid #ccc; padding: 0.6em 0; line-height: 1.9; }}
.prompt {{ color: #777; white-space: pre-wrap; }}
.tok {{ font-family: monospace; white-space: pre; border-radius: 2px; }}
.kept {{ border-bottom: 2px solid #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 0.1em 0.8em; text-align: left; }}
</style></head><body>
<h1>Token scores: {scorer}</h1>
<p>Each response token is coloured by its score (blue = low, orange = high, scaled between the 1st and 99th
percentile of all scores); underlined tokens are in <code>token_mask</code>. Hover a token for its score.</p>
"""


def _colour(value: float, low: float, high: float) -> str:
    x = 0.0 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    red, green, blue = int(70 + 185 * x), int(130 + 30 * x), int(230 - 200 * x)
    return f"rgba({red},{green},{blue},0.55)"


def score_statistics(scores: list[list[float]]) -> dict:
    flat = torch.tensor([s for row in scores for s in row], dtype=torch.float64)
    quantiles = torch.quantile(flat, torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99], dtype=torch.float64)).tolist()
    return {"mean": flat.mean().item(), "std": flat.std().item() if flat.numel() > 1 else 0.0,
            "min": flat.min().item(), "max": flat.max().item(),
            "p01": quantiles[0], "p25": quantiles[1], "p50": quantiles[2], "p75": quantiles[3], "p99": quantiles[4]}


def _page(scored, new, tokenizer, dataset, config, summary, stats) -> str:
    parts = [HTML_HEAD.format(scorer=html.escape(config.scorer)), "<table>"]
    for key, value in {**summary, **{f"score {k}": round(v, 4) for k, v in stats.items()}}.items():
        parts.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    tokenized = scored["tokenized"]
    for index in range(min(config.report_examples, len(tokenized))):
        labels = tokenized[index]["labels"]
        response_ids = [label for label in labels[1:] if label != -100]
        scores, mask = new["token_scores"][index], new["token_mask"][index]
        spans = []
        for token_id, score, kept in zip(response_ids, scores, mask):
            text = html.escape(tokenizer.decode([token_id]))
            css = "tok kept" if kept else "tok"
            spans.append(f'<span class="{css}" style="background:{_colour(score, stats["p01"], stats["p99"])}" '
                         f'title="{score:.4f}">{text}</span>')
        prompt = html.escape(str(dataset[index]["prompt"]))
        parts.append(f'<div class="example"><b>example {index}</b> (score_mean {new["score_mean"][index]:.4f})<br>'
                     f'<span class="prompt">{prompt}</span>{"".join(spans)}</div>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _histogram(path: Path, scores: list[list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist([s for row in scores for s in row], bins=60, color="#d9822b")
    axis.set_xlabel("token score")
    axis.set_ylabel("response tokens")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report_dir: str, scored, new, tokenizer, dataset, config, summary) -> dict:
    """Write report.html, score_histogram.png and summary.json into `report_dir`; return their paths."""
    folder = Path(report_dir)
    stats = score_statistics(new["token_scores"])

    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "report.html").write_text(_page(scored, new, tokenizer, dataset, config, summary, stats),
                                         encoding="utf-8")
        _histogram(tmp / "score_histogram.png", new["token_scores"], f"token scores: {config.scorer}")
        (tmp / "summary.json").write_text(json.dumps({**summary, "score_statistics": stats}, indent=2) + "\n",
                                          encoding="utf-8")

    replace_atomically(folder, write)
    return {name: str(folder / name) for name in ("report.html", "score_histogram.png", "summary.json")}
