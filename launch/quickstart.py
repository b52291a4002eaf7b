"""`tokensieve quickstart`: the whole mission on the tiny synthetic tasks, offline, in one command.

    tokensieve quickstart [--out outputs/quickstart] [--base outputs/base/tiny_recall] [--steps-scale 1]

Stages, each in its own folder under --out (a stage is finished when its stage.json is written):
    data            the synthetic tasks: mqar and needle-qa by the commands in data/tasks/<task>/meta.json; the two
                    grounds of token selection, noisy-recall and mapped-recall (noisy train rows, a clean copy for the
                    references); and the base's datasets, made by the `tokensieve data make` lines of
                    recipes/base/tiny_recall.sh
    base            the tiny recall base from scratch, as recipes/base/tiny_recall.sh trains it (skipped with --base)
    reference       the base fine-tuned on clean noisy-recall: Rho-1's, PRIOR's and curation's reference
    sft, rho1, prior, sstoken
                    the base fine-tuned on noisy-recall (the base already does its clean task; the noise is in the
                    answers): plain SFT and the token-selection methods (recipes/tiny/)
    curate          `tokensieve curate` (excess loss over the reference, top 60% per response), then the base
                    fine-tuned on the curated token_mask only
    mapped_sft, mapped_sstoken
                    plain SFT and ssToken on mapped-recall, where the base cannot do the clean task before fine-tuning
                    (the ground ssToken was made for: its history score favours what the model is learning)
The token-selection stages fine-tune every weight, as the benchmark does (on the earlier noisy-sft stages, LoRA r16
on this 1M-parameter base stayed at exact match 0.01 after 150 steps where full fine-tuning reached 0.085); `--lora`
trains LoRA adapters instead.
    trim_kv         TRIM-KV retention gates on the frozen base (recipes/tiny/trim_kv.yaml)
    trim_kv_evict   those gates fine-tuned with straight-through eviction (recipes/tiny/trim_kv_evict.yaml)
    query_selector  a QTSplus-style query selector trained with LoRA adapters, fixed 10% of the context
                    (recipes/tiny/query_selector_lora.yaml: the frozen tiny base cannot answer from a context with gaps)
    reload          every export loaded again in a fresh `tokensieve eval` process: exact match on the test splits
                    (LoRA adapters; the gates generating from a bounded KV cache; the selector answering from the
                    context tokens it keeps)
Then one markdown table on stdout and in OUT/results.md, and the raw numbers in OUT/results.json.

With --real (after `bash install.sh --real` and `tokensieve model prepare smollm2`), one more stage:
    real            SmolLM2-135M-Instruct on the shipped real-prose pass-key test (data/tasks/passkey-1k): the full
                    cache, the retention gates shipped in recipes/smollm2/gates (plain and decayed attention) and
                    the heuristic caches at the same 10% budget, each in a fresh `tokensieve eval` process; a
                    second table
(`tokensieve quickstart --resume --real` after a finished quickstart runs only that stage.)

Training stages run in this process through the same launcher as `tokensieve train` (recipe + overrides: output
folder under --out, short max_steps), each a W&B run (offline unless WANDB_MODE says otherwise) under OUT/wandb.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tokensieve.errors import TokensieveError

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_SCRIPT = "recipes/base/tiny_recall.sh"
SHIPPED_TASKS = ("mqar", "needle-qa")  # the tasks the method recipes read, made as data/tasks/<task>/meta.json says
TOKEN_TASKS = ("noisy-recall", "mapped-recall")  # the token-selection grounds: noisy train rows and a clean copy
TOKEN_ROWS = 10000  # train rows of each ground (a stage reads its steps * TOKEN_BATCH of them)
TASKS = TOKEN_TASKS + SHIPPED_TASKS  # the table's columns
LORA = ["--peft.r", "16", "--peft.lora_alpha", "32", "--peft.lora_dropout", "0.0", "--peft.target_modules",
        "all-linear"]
TOKEN_BATCH = 32  # per_device_train_batch_size of the recipes/tiny token-selection recipes
TOKEN_STEPS = 150  # noisy-recall: the base knows the task, and 150 steps tell the methods apart
# mapped-recall: the model has to learn the task first; at 150 steps plain SFT reached 0.135 and ssToken 0.010 (a fresh
# quickstart, 2026-12-07). At 300 steps on this 10,000-row file SFT reaches 0.44-0.47 and ssToken 0.000-0.024 (3
# seeds); on the benchmark's 8,000-row file, the same rows up to row 8,000, ssToken 0.57-0.64 (docs/results.md)
MAPPED_STEPS = 300
RECALL = SHIPPED_TASKS  # the recall tasks the gates and the selector are scored on
# The gates' cache in the table: 32 + 8 tokens per layer and kv head, about 25% of a prompt. (The recipe trains at
# M = 22; a needle-qa row holds 32 facts, and gates that cannot know the question keep all of them only from 32 up.)
GATE_CACHE = ("--memory-size", "32", "--buffer-size", "8")


# The real-model stage (--real): the prepared model, the gates shipped for it, the shipped test, one budget.
REAL_MODEL = "models/SmolLM2-135M-Instruct"
REAL_GATES = "recipes/smollm2/gates"
REAL_TEST = "data/tasks/passkey-1k/test.jsonl"
REAL_BUDGET = "0.1"
REAL_ROWS = (  # (row, title, model, eval options)
    ("full cache", "the whole prompt in the KV cache", REAL_MODEL, ()),
    ("gates", f"TRIM-KV gates shipped in {REAL_GATES}, plain attention (as in the paper)", REAL_GATES,
     ("--memory-ratio", REAL_BUDGET, "--attention", "plain")),
    ("gates decayed", "the same gates, the cache attending with the training bias", REAL_GATES,
     ("--memory-ratio", REAL_BUDGET, "--attention", "decayed")),
    ("streaming", "StreamingLLM (first 4 + the most recent tokens)", REAL_MODEL,
     ("--policy", "streaming", "--memory-ratio", REAL_BUDGET)),
    ("h2o", "H2O (attention received so far + the recent half)", REAL_MODEL,
     ("--policy", "h2o", "--memory-ratio", REAL_BUDGET)),
    ("snapkv", "SnapKV (attention from the last 32 queries of each prompt chunk)", REAL_MODEL,
     ("--policy", "snapkv", "--memory-ratio", REAL_BUDGET)),
)


@dataclass(frozen=True)
class Eval:
    """One row of the results table: an export reloaded by `tokensieve eval` on test splits."""

    row: str
    title: str
    tasks: tuple[str, ...]  # names in TASKS
    args: tuple[str, ...] = ()
    export: str | None = None  # another stage's export (default: the stage's own)


@dataclass(frozen=True)
class Stage:
    """One quickstart stage. `kind`: data, base, train (a recipe + overrides; {placeholders} filled in when the
    stage runs) or reload. `exports`: what a train stage writes (model: a full or LoRA model, by --lora; gates;
    selector). `evals`: its rows in the results table, in table order."""

    name: str
    title: str
    kind: str = "train"
    recipe: str | None = None
    steps: int = 0
    extra: tuple[str, ...] = ()
    exports: str = "model"
    evals: tuple[Eval, ...] = ()
    task: str | None = None  # a token-selection stage's ground (TOKEN_TASKS): it trains on that task's noisy rows


def _token_stage(name: str, task: str, recipe: str, title: str, extra: tuple[str, ...] = (),
                 steps: int = TOKEN_STEPS) -> Stage:
    return Stage(name, title, recipe=recipe, steps=steps, extra=extra, evals=(Eval(name, title, (task,)),), task=task)


STAGES = (
    Stage("data", "synthetic tasks", kind="data"),
    Stage("base", "tiny recall base", kind="base", evals=(Eval("base", "tiny recall base, full KV cache", TASKS),)),
    _token_stage("reference", "noisy-recall", "recipes/tiny/sstoken.yaml", "SFT on clean noisy-recall (the reference)",
                 ("--token_scorer", "none", "--data.datasets.0.path", "{clean}")),
    _token_stage("sft", "noisy-recall", "recipes/tiny/sstoken.yaml", "plain SFT", ("--token_scorer", "none")),
    _token_stage("rho1", "noisy-recall", "recipes/tiny/rho1.yaml", "Rho-1, top 60% by excess loss",
                 ("--reference_model", "{reference}")),
    _token_stage("prior", "noisy-recall", "recipes/tiny/prior.yaml",
                 "PRIOR-style weights (need a reference without a condition; a clean one favours the noise)",
                 ("--reference_model", "{reference}")),
    _token_stage("sstoken", "noisy-recall", "recipes/tiny/sstoken.yaml",
                 "ssToken, top 60% per response (history: the base, which already knows the clean answers)"),
    _token_stage("curate", "noisy-recall", "recipes/tiny/sstoken.yaml",
                 "curated token_mask (excess loss), then SFT on it",
                 ("--token_scorer", "column", "--token_weights_column", "token_mask", "--data.datasets.0.path",
                  "{curated}")),
    _token_stage("mapped_sft", "mapped-recall", "recipes/tiny/sstoken.yaml", "plain SFT", ("--token_scorer", "none"),
                 steps=MAPPED_STEPS),
    _token_stage("mapped_sstoken", "mapped-recall", "recipes/tiny/sstoken.yaml",
                 "ssToken, top 60% per response (the base cannot answer yet)", steps=MAPPED_STEPS),
    Stage("trim_kv", "TRIM-KV retention gates", recipe="recipes/tiny/trim_kv.yaml", steps=300, exports="gates",
          evals=(Eval("trim_kv", "TRIM-KV gates, bounded KV cache", RECALL, GATE_CACHE),)),
    Stage("trim_kv_evict", "the gates fine-tuned with eviction", recipe="recipes/tiny/trim_kv_evict.yaml", steps=100,
          extra=("--init_gates", "{trim_kv}"), exports="gates",
          evals=(Eval("trim_kv_evict", "the gates fine-tuned with eviction, same cache", RECALL, GATE_CACHE),
                 Eval("trim_kv streaming", "StreamingLLM, same export and budget", RECALL,
                      ("--policy", "streaming", *GATE_CACHE), export="trim_kv"))),
    Stage("query_selector", "query selector + LoRA, 10% of the context",
          recipe="recipes/tiny/query_selector_lora.yaml", steps=300, extra=("--keep_ratio_anneal_steps", "{anneal}"),
          exports="selector", evals=(Eval("query_selector", "query selector + LoRA, 10% of the context", ("needle-qa",),
                                          ("--selector",)),)),
    Stage("reload", "every export in a fresh process", kind="reload"),
)
TRAINING = [stage.name for stage in STAGES if stage.kind == "train"]
EXPORT_FILES = {"gates": ("gates.json", "gates.safetensors"), "selector": ("selector.json", "selector.safetensors"),
                "model": ("config.json", "model.safetensors"), "lora": ("adapter_config.json",
                                                                        "adapter_model.safetensors")}


def script_commands(path: Path) -> list[list[str]]:
    """The `tokensieve data make` and `tokensieve train` lines of a shell script, as argument lists (without the
    word `tokensieve`); other lines (e.g. its evaluation) are left out: the quickstart evaluates by itself.

    Output redirections and "$@" (the script's own arguments) are dropped; any other shell expansion is an error,
    since the quickstart runs these commands itself rather than through a shell.
    """
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens[:3] != ["tokensieve", "data", "make"] and tokens[:2] != ["tokensieve", "train"]:
            continue
        tokens = [t for t in tokens[1:] if t != "$@" and not t.startswith((">", "2>", "&>"))]
        if any("$" in t for t in tokens):
            raise TokensieveError(f"{path}: cannot run `{line.strip()}` without a shell (it expands a variable)")
        commands.append(tokens)
    return commands


def with_out(tokens: list[str], out: Path) -> tuple[list[str], str]:
    """(`data make` arguments with --out replaced by `out`, the original --out)."""
    for i, token in enumerate(tokens):
        if token == "--out" and i + 1 < len(tokens):
            return tokens[:i + 1] + [str(out)] + tokens[i + 2:], tokens[i + 1]
        if token.startswith("--out="):
            return tokens[:i] + [f"--out={out}"] + tokens[i + 1:], token.split("=", 1)[1]
    raise TokensieveError(f"`tokensieve {' '.join(tokens)}` has no --out")


def run_cli(tokens: list[str]) -> None:
    """Run a `tokensieve` command in this process; a non-zero status is an error naming the command."""
    from tokensieve.launch.cli import main

    if main(tokens) != 0:
        raise TokensieveError(f"`tokensieve {shlex.join(tokens)}` failed (see its message above)")


def data_overrides(recipe: Path, folders: dict[str, Path]) -> list[str]:
    """Overrides that point every data path of `recipe` under a key of `folders` at the same file in its value."""
    from tokensieve.launch.recipe import read_yaml

    data = read_yaml(recipe.read_text(encoding="utf-8")).get("data") or {}
    overrides = []
    for section in ("curriculum", "datasets", "eval_datasets"):
        for i, entry in enumerate(data.get(section) or []):
            path = Path(str(entry.get("path", "")))
            for source, target in folders.items():
                if path.parts[:len(Path(source).parts)] == Path(source).parts:
                    overrides += [f"--data.{section}.{i}.path", str(target / path.relative_to(source))]
    return overrides


def train_file(path: Path) -> list[str]:
    """The override that makes `path` a recipe's only training dataset."""
    return ["--data.datasets", json.dumps([{"path": str(path)}])]


class Quickstart:
    """The stages in order; each writes into OUT/<stage>/ and records itself in `self.stages`."""

    def __init__(self, out, base: str | None, steps_scale: float, test_rows: int, resume: bool, lora: bool):
        self.out = Path(out).resolve()
        self.given_base = base
        self.base = str(Path(base).resolve()) if base else str(self.out / "base")
        self.steps_scale, self.test_rows, self.resume, self.lora = steps_scale, test_rows, resume, lora
        self.stages: dict[str, dict] = {}
        self.started = time.time()
        self.data_folders: dict[str, Path] = {}  # folder a recipe names -> the folder the data stage wrote

    # --- running stages ---------------------------------------------------------------------------------------

    def run(self) -> dict:
        reusing = self.resume
        for number, stage in enumerate(STAGES, 1):
            name, title = stage.name, stage.title
            folder = self.out / name
            marker = folder / "stage.json"
            reusing = reusing and marker.is_file()  # only a leading run of finished stages is reused
            elapsed = time.time() - self.started
            print(f"\n=== [quickstart {number}/{len(STAGES)}] {name}: {title} (elapsed {elapsed // 60:.0f}:"
                  f"{elapsed % 60:02.0f}) ===", flush=True)
            if name == "base" and self.given_base:
                self.stages[name] = {"status": "given (--base)", "export": self.base, "seconds": 0.0}
                print(f"[quickstart] base: using {self.base}", flush=True)
                continue
            if reusing:
                self.stages[name] = {**json.loads(marker.read_text()), "status": "reused (--resume)"}
                self._restore(name)
                print(f"[quickstart] {name}: finished by an earlier run, reused", flush=True)
                continue
            marker.unlink(missing_ok=True)
            folder.mkdir(parents=True, exist_ok=True)
            start = time.time()
            try:
                record = self._run_stage(stage, folder)
            except KeyboardInterrupt:
                raise
            except Exception as error:
                if not isinstance(error, TokensieveError):
                    traceback.print_exc()
                message = " ".join(str(error).split()) or type(error).__name__
                raise TokensieveError(f"quickstart stage '{name}' failed: {message} (its files: {folder}; "
                                      f"rerun with --resume to keep the stages before it)") from error
            finally:
                _close_wandb_run()
            record = {**record, "stage": name, "title": title, "seconds": round(time.time() - start, 1),
                      "status": "ran"}
            _write_json(marker, record)
            self.stages[name] = record
            print(f"[quickstart] {name} done in {record['seconds']:.0f} s", flush=True)
        return self.stages

    def _run_stage(self, stage: Stage, folder: Path) -> dict:
        if stage.kind == "train":
            return self._stage_training(stage, folder)
        return {"data": self._stage_data, "base": self._stage_base, "reload": self._stage_reload}[stage.kind](folder)

    def _restore(self, name: str) -> None:
        if name == "data":
            self.data_folders = {k: Path(v) for k, v in self.stages["data"]["folders"].items()}

    def _steps(self, default: int) -> int:
        return max(1, round(default * self.steps_scale))

    # --- stages -----------------------------------------------------------------------------------------------

    def _stage_data(self, folder: Path) -> dict:
        """The method tasks from their shipped meta.json commands, the token grounds (noisy, and a clean copy with
        another seed: the reference's), and the base's data."""
        for task in SHIPPED_TASKS:
            meta = json.loads((REPO_ROOT / "data/tasks" / task / "meta.json").read_text())
            tokens, source = with_out(shlex.split(meta["command"])[1:], folder / "tasks" / task)
            run_cli(tokens)
            self.data_folders[source] = folder / "tasks" / task
        for task in TOKEN_TASKS:  # seed 0: the test split is the one shipped in data/tasks/<task>/
            run_cli(["data", "make", task, "--out", str(self.token_data(task)), "--n", str(TOKEN_ROWS), "--seed", "0"])
            run_cli(["data", "make", task, "--out", str(self.token_data(task, clean=True)), "--n", str(TOKEN_ROWS),
                     "--seed", "101", "--unlearnable_share", "0", "--learnable_share", "0"])
        if not self.given_base:
            for tokens in script_commands(REPO_ROOT / BASE_SCRIPT):
                if tokens[:2] == ["data", "make"]:
                    source = with_out(tokens, folder)[1]
                    target = folder / "base" / Path(source).name
                    run_cli(with_out(tokens, target)[0])
                    self.data_folders[source] = target
        return {"folders": {k: str(v) for k, v in self.data_folders.items()}}

    def _stage_base(self, folder: Path) -> dict:
        """`bash recipes/base/tiny_recall.sh` in this process: its train line, data paths pointed at OUT/data."""
        trains = [t for t in script_commands(REPO_ROOT / BASE_SCRIPT) if t[:1] == ["train"]]
        if len(trains) != 1:
            raise TokensieveError(f"{BASE_SCRIPT}: expected one `tokensieve train` line, found {len(trains)}")
        recipe, extra = REPO_ROOT / trains[0][1], trains[0][2:]
        overrides = extra + data_overrides(recipe, self.data_folders) + [
            "--training.output_dir", str(folder), "--run_name", "quickstart-base", "--report_to", "[wandb]"]
        self._train(recipe, overrides)
        self._check_export(folder, ("config.json", "model.safetensors", "tokenizer.json"))
        return {"export": str(folder), "recipe": str(recipe.relative_to(REPO_ROOT)), "overrides": overrides}

    def _stage_training(self, stage: Stage, folder: Path) -> dict:
        name, recipe_name, extra = stage.name, stage.recipe, stage.extra
        recipe = REPO_ROOT / recipe_name
        steps = self._steps(stage.steps)
        fill = {"anneal": str(max(steps * 2 // 3, 1)), "trim_kv": str(self.out / "trim_kv")}
        if stage.task:  # a token ground: its noisy rows (or the clean copy, the curated rows), no eval split
            fill.update(reference=str(self.out / "reference"), clean=str(self.token_data(stage.task, True) / "train.jsonl"),
                        curated=str(self.out / "curate" / "curated.parquet"))
            data = train_file(self.token_data(stage.task) / "train.jsonl") + ["--data.eval_datasets", "[]"]
        else:
            data = data_overrides(recipe, self.data_folders)
        overrides = data + [x.format(**fill) for x in extra] + [
            "--training.output_dir", str(folder), "--max_steps", str(steps), "--logging_steps", str(max(steps // 5, 1)),
            "--save_strategy", "no", "--resume_from_checkpoint", "false", "--report_to", "[wandb]",
            "--run_name", f"quickstart-{name}", "--model.name_or_path", self.base]
        exports = stage.exports
        if exports == "model":  # the token-selection stages fine-tune the base itself (or LoRA adapters on it)
            overrides += ["--model.from_scratch", "null", *(LORA if self.lora else [])]
            exports = "lora" if self.lora else "model"
        files = EXPORT_FILES[exports]
        record = {}
        if name == "curate":
            record["curation"] = self._curate(folder, self.token_data(stage.task) / "train.jsonl", steps * TOKEN_BATCH)
        self._train(recipe, overrides)
        self._check_export(folder, files)
        return {**record, "export": str(folder), "recipe": recipe_name, "steps": steps, "overrides": overrides}

    def _curate(self, folder: Path, train: Path, rows: int) -> dict:
        """`tokensieve curate recipes/tiny/curate.yaml` on `train`: score the base's tokens against the reference."""
        from tokensieve.launch.curate import run_curation
        from tokensieve.launch.recipe import load_curate_recipe

        recipe = REPO_ROOT / "recipes/tiny/curate.yaml"
        overrides = train_file(train) + [
            "--model.name_or_path", self.base, "--reference_model", str(self.out / "reference"),
            "--output", str(folder / "curated.parquet"), "--data.max_train_samples", str(rows)]
        summary = run_curation(load_curate_recipe(recipe, overrides))
        print(f"[quickstart] curate: kept {summary['kept_tokens']} of {summary['response_tokens']} response tokens "
              f"of {summary['examples_written']} examples; report {summary['report']['report.html']}", flush=True)
        return {key: summary[key] for key in ("scorer", "examples_written", "response_tokens", "kept_tokens")}

    def export_of(self, stage: str) -> str:
        return self.base if stage == "base" else str(self.out / stage)

    def token_data(self, task: str, clean: bool = False) -> Path:
        """The folder of a token ground's noisy rows (or of its clean copy)."""
        return self.out / "data" / "tasks" / (f"{task}-clean" if clean else task)

    def _train(self, recipe: Path, overrides: list[str]) -> None:
        from tokensieve.launch.launcher import launch

        print(f"[quickstart] tokensieve train {recipe.relative_to(REPO_ROOT)} {shlex.join(overrides)}", flush=True)
        launch(recipe, overrides)

    @staticmethod
    def _check_export(folder: Path, files) -> None:
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise TokensieveError(f"training finished but the export in {folder} lacks {', '.join(missing)}")

    def _stage_reload(self, folder: Path) -> dict:
        """Each export in a fresh `python -m tokensieve eval` process; returns {row name: results per task}."""
        tests = {task: str(self.data_folders.get(f"data/tasks/{task}", REPO_ROOT / "data/tasks" / task) / "test.jsonl")
                 for task in SHIPPED_TASKS}
        tests.update({task: str(self.token_data(task) / "test.jsonl") for task in TOKEN_TASKS})
        runs = [(e.row, self.export_of(e.export or stage.name), [tests[t] for t in e.tasks], list(e.args))
                for stage in STAGES for e in stage.evals]
        results = {}
        for name, export, files, extra in runs:
            command, by_file = fresh_eval(f"reload {name}", export, files, self.test_rows,
                                          folder / f"{name.replace(' ', '-')}.json", extra,
                                          failure=f"reloading {export} in a fresh process failed")
            results[name] = {"export": export, "command": command,
                             "tasks": {task: by_file[path] for task, path in tests.items() if path in by_file}}
        return {"results": results}


def fresh_eval(label: str, model: str, files: list[str], rows: int, output: Path, extra, failure: str,
               files_at: Path | None = None) -> tuple[str, dict]:
    """`python -m tokensieve eval` in a fresh process, from the repository root; returns (its arguments as one line,
    its results per file). A failed run raises `failure: the command` (and where its files are, if given)."""
    command = [sys.executable, "-m", "tokensieve", "eval", model, *[a for f in files for a in ("--data", f)],
               "--max-examples", str(rows), "--output", str(output), *extra]
    print(f"[quickstart] {label}: {shlex.join(command[1:])}", flush=True)
    if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
        where = f" (its files: {files_at})" if files_at else ""
        raise TokensieveError(f"{failure}: {shlex.join(command)}{where}")
    return shlex.join(command[1:]), json.loads(output.read_text())["results"]


def _close_wandb_run() -> None:
    """End the stage's W&B run: the Trainer leaves it open, and the next stage would log into it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _write_json(path: Path, value) -> None:
    from tokensieve.launch.export import replace_atomically

    replace_atomically(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8"))


def results_table(stages: dict, test_rows: int, lora: bool = False) -> str:
    """One markdown table: a row per export, exact match per test set, training steps and seconds."""
    reload = stages["reload"]["results"]
    # (row, title, the stage whose steps and seconds it shows: none for a row that reuses another stage's export)
    rows = [(e.row, e.title, stage.name if e.export is None else None) for stage in STAGES for e in stage.evals]
    lines = ["| stage | method | steps | train s | noisy-recall (clean test) | mapped-recall (clean test) | mqar "
             "| needle-qa |", "|---|---|---|---|---|---|---|---|"]
    for name, title, stage in rows:
        tasks = reload[name]["tasks"]
        cells = []
        for task in TASKS:
            if task not in tasks:
                cells.append("—")
                continue
            entry = tasks[task]
            cell = f"{entry['exact_match']:.3f}"
            if "kept_share" in entry:
                cell += f" ({entry['kept_share']:.0%} kept)"
            cells.append(cell)
        record = stages[stage] if stage is not None else {}
        seconds = f"{record['seconds']:.0f}" if "steps" in record else "—"
        lines.append(f"| {name} | {title} | {record.get('steps', '—')} | {seconds} | " + " | ".join(cells) + " |")
    gates = reload["trim_kv"]["tasks"].get("mqar", {})
    total = sum(record.get("seconds", 0) for record in stages.values())
    tuned = "LoRA r16 adapters on the base" if lora else "the base, every weight"
    lines += ["", f"Exact match of greedy answers on {test_rows} rows (drawn with seed 0) of each test split, every "
              f"export reloaded in a fresh `tokensieve eval` process. Token-selection rows: {tuned}, fine-tuned on "
              f"noisy training answers (25% a random word, 35% the asked key echoed back, 40% right), scored on the "
              f"clean test split. noisy-recall: the base already answers it, and the methods must avoid the noise; "
              f"Rho-1, PRIOR and the curation score against the reference. mapped-recall (answer the recalled "
              f"value's partner under a fixed mapping, plus boilerplate the base already predicts): the base "
              f"cannot answer before fine-tuning. KV cache of the gates and StreamingLLM: {gates.get('memory_size')} + "
              f"{gates.get('buffer_size')} tokens per layer and kv head. Short runs that exercise every stage, not "
              f"the benchmark results. Stage times add up to {total:.0f} s."]
    return "\n".join(lines)


def check_real_stage() -> None:
    """The real-model stage's inputs, checked before any stage runs."""
    if not (REPO_ROOT / REAL_MODEL / "config.json").is_file():
        raise TokensieveError(f"--real: no prepared model in {REPO_ROOT / REAL_MODEL}: bash install.sh --real, then "
                              "tokensieve model prepare smollm2")
    if not (REPO_ROOT / REAL_GATES / "gates.json").is_file():
        raise TokensieveError(f"--real: the shipped gate export {REPO_ROOT / REAL_GATES} is missing (gates.json)")


def run_real_stage(folder: Path, rows: int, resume: bool) -> dict:
    """The real-model stage: each REAL_ROWS cache in a fresh `tokensieve eval` process on the shipped pass-key test."""
    marker = folder / "stage.json"
    print(f"\n=== [quickstart] real: {REAL_MODEL.split('/')[-1]}, pass key in ~1K tokens of prose, "
          f"{float(REAL_BUDGET):.0%} KV budget ===", flush=True)
    earlier = json.loads(marker.read_text()) if resume and marker.is_file() else {}
    if earlier.get("rows") == rows:
        print("[quickstart] real: finished by an earlier run, reused", flush=True)
        return {**earlier, "status": "reused (--resume)"}
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    start, results = time.time(), {}
    for name, title, model, extra in REAL_ROWS:
        command, by_file = fresh_eval(f"real {name}", model, [REAL_TEST], rows,
                                      folder / f"{name.replace(' ', '-')}.json", ("--batch-size", "4", *extra),
                                      failure="quickstart stage 'real' failed", files_at=folder)
        results[name] = {"title": title, "command": command, **by_file[REAL_TEST]}
    record = {"stage": "real", "rows": rows, "results": results, "seconds": round(time.time() - start, 1),
              "status": "ran"}
    _write_json(marker, record)
    return record


def real_table(record: dict) -> str:
    """The real-model stage's table: exact match and the cache's size per row."""
    lines = ["| cache | method | pass key (exact match) | KV tokens per layer and kv head |", "|---|---|---|---|"]
    for name, entry in record["results"].items():
        size = f"{entry['memory_size']} + {entry['buffer_size']}" if "memory_size" in entry else "all"
        lines.append(f"| {name} | {entry['title']} | {entry['exact_match']:.3f} | {size} |")
    lines += ["", f"{REAL_MODEL.split('/')[-1]} on {record['rows']} rows of {REAL_TEST} (a five-digit pass key in "
              f"about 1040 tokens of held-out prose), greedy answers, each cache in a fresh `tokensieve eval` "
              f"process; bounded caches at {float(REAL_BUDGET):.0%} of each prompt (buffer M / 4). "
              f"The stage took {record['seconds']:.0f} s."]
    return "\n".join(lines)


def run_quickstart(out="outputs/quickstart", base: str | None = None, steps_scale: float = 1.0, test_rows: int = 200,
                   resume: bool = False, lora: bool = False, real: bool = False, real_rows: int = 20) -> dict:
    """Run every stage (see the module docstring); print and write the results table. Returns the stage records."""
    import importlib.util

    if real:
        check_real_stage()
        if real_rows < 1:
            raise TokensieveError(f"--real-rows must be >= 1, got {real_rows}")
    if not (REPO_ROOT / BASE_SCRIPT).is_file():
        raise TokensieveError(f"{REPO_ROOT / BASE_SCRIPT} not found: the quickstart runs from a clone of the "
                              f"repository (pip install -e .)")
    if base and not (Path(base) / "config.json").is_file():
        raise TokensieveError(f"--base {base}: not a saved model folder (no config.json)")
    if steps_scale <= 0 or test_rows < 1:
        raise TokensieveError(f"--steps-scale must be > 0 and --test-rows >= 1, got {steps_scale} and {test_rows}")
    if importlib.util.find_spec("wandb") is None:
        raise TokensieveError("the quickstart logs every stage to W&B (offline): pip install 'tokensieve[wandb]'")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Offline unless the user says otherwise; the eval processes inherit these. Set before transformers and wandb
    # are imported (they read some once), and put back afterwards.
    defaults = {"WANDB_MODE": "offline", "WANDB_DIR": str(out), "WANDB_PROJECT": "tokensieve-quickstart",
                "HF_HUB_OFFLINE": "1"}
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        stages = Quickstart(out, base, steps_scale, test_rows, resume, lora).run()
        if real:
            stages["real"] = run_real_stage(out / "real", real_rows, resume)
    finally:
        for name in added:
            os.environ.pop(name, None)
    table = results_table(stages, test_rows, lora)
    if real:
        table += "\n\nA real pretrained model:\n\n" + real_table(stages["real"])
    from tokensieve.launch.export import replace_atomically

    replace_atomically(out / "results.md", lambda p: p.write_text(table + "\n", encoding="utf-8"))
    _write_json(out / "results.json", {"out": str(out), "base": base, "steps_scale": steps_scale,
                                       "test_rows": test_rows, "lora": lora, "real": real, "stages": stages})
    print("\n" + table + f"\n\nwritten: {out / 'results.md'}, {out / 'results.json'}", flush=True)
    return stages
