"""``python -m minipaged.models.prepare``: convert the embedded SmolLM2 GGUF to a safetensors cache dir, once.

Idempotent: when the cache already holds a conversion of the installed GGUF it only
says so. The cache lives under ``$MINIPAGED_CACHE_DIR`` (default ``~/.cache/minipaged``).
"""

from __future__ import annotations

import argparse
import sys

from minipaged.models.loader import convert_gguf, default_model_dir, default_model_is_prepared, embedded_gguf_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipaged.models.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="convert again even if the cache is up to date")
    args = parser.parse_args(argv)
    if default_model_is_prepared() and not args.force:
        print(f"minipaged: default model already prepared in {default_model_dir()}")
        return 0
    convert_gguf(embedded_gguf_path(), default_model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
